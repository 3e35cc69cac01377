"""bench/preference.py --check: lorafit's DPO, IPO and SimPO losses and rewards equal TRL's (to 1e-5 relative) on the
same tiny model, adapter and batch, with the same token ids. TRL is a bench requirement only: CI without it skips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parent.parent


def test_losses_and_rewards_match_trl_on_tiny_llama():
    sys.path.insert(0, str(REPO / "bench"))
    import preference

    res = preference.check("tiny-llama", quiet=True)
    assert set(res["table"]) == {"dpo", "ipo", "simpo"}
    for objective, figures in res["table"].items():
        assert set(figures) == set(preference.FIGURES)
        for figure, (ours, trl, rel) in figures.items():
            assert rel <= 1e-5, f"{objective} {figure}: lorafit {ours} vs TRL {trl}"
        # a random adapter, not B=0: the policy differs from the reference, so the margins are no trivial 0 == 0
        assert abs(figures["rewards/margins"][0]) > 0.05
    for objective in ("dpo", "ipo"):  # the very ids TRL's DPOTrainer feeds its model, in conversational form
        tokens = res["tokens"][objective]
        assert tokens["batch_identical"]
        assert tokens["conversational"]["identical"] == tokens["conversational"]["pairs"] > 0
        assert tokens["strings"]["identical"] == 0  # plain strings: TRL applies no chat template, lorafit does
    assert res["ok"]
