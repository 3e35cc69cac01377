"""bench/grpo.py --check: lorafit's GRPO, DAPO and Dr. GRPO losses, advantages, rewards, KL and clip ratio equal TRL's
GRPOTrainer's (within 1e-5) on the same tiny model, adapter, prompt ids and completions. TRL is a bench requirement
only: CI without it skips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parent.parent


def test_losses_and_advantages_match_trl_on_tiny_llama():
    sys.path.insert(0, str(REPO / "bench"))
    import grpo as bench

    res = bench.check("tiny-llama", quiet=True)
    assert res["tokens_equal"]  # the very prompt ids TRL's chat template gives
    assert set(res["table"]) == {f"{t} beta={b:g}" for t, b in bench.CASES}
    for case, figures in res["table"].items():
        for figure, (ours, trl, diff) in figures.items():
            assert diff <= bench.TOLERANCE, f"{case} {figure}: lorafit {ours} vs TRL {trl}"
        # not a trivial 0 == 0: the ratios are off 1 and some tokens are clipped
        assert abs(figures["loss"][0]) > 1e-3 and figures["clip_ratio"][0] > 0
        if "beta=0.04" in case:
            assert figures["kl"][0] > 0.01
    assert res["advantage_spread"] > 0.1  # rewards differ within the groups: the advantages are not all 0
    assert res["ok"]
