"""Precision and MFU: auto picks bf16 exactly where it is native, FLOPs are counted right, the peak is cached."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLS, compose, run_inprocess

from lorafit import hardware
from lorafit.flops import FlopCounter


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "no"), (True, False, "bf16"), (False, True, "bf16")])
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert hardware.resolve_precision("auto") == expected
    assert hardware.resolve_precision("no") == "no" and hardware.resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("native", [False, True])
def test_the_run_says_which_precision_ran_and_its_mfu(tmp_path, monkeypatch, native):
    monkeypatch.setattr(hardware, "native_bf16", lambda: native)
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))  # a fresh peak probe
    _, summary = run_inprocess(tmp_path, *TINY_CLS, "train.mixed_precision=auto", "train.max_steps=4", "hooks=[]")
    assert summary["precision"] == ("bf16" if native else "fp32")
    assert summary["model_flops_per_s"] > 0 and 0 < summary["mfu"] < 1.5
    assert summary["mfu"] == pytest.approx(summary["model_flops_per_s"] / summary["peak_flops_per_s"])
    assert (tmp_path / "cache" / "peak_flops.json").is_file()


def test_flop_counter_matches_a_hand_count():
    """Frozen -> LoRA -> frozen on 6 tokens. Per Linear: 2·T·d_in·d_out forward, again for the input's gradient
    when the input needs one, again for the weight's gradient when the weight trains."""
    torch.manual_seed(0)
    l1, l2, l3 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    a, b = torch.nn.Linear(16, 2, bias=False), torch.nn.Linear(2, 16, bias=False)  # LoRA on l2
    model = torch.nn.ModuleList([l1, l2, l3, a, b])
    for m in (l1, l2, l3):
        m.requires_grad_(False)
    counter = FlopCounter(model)
    h = l1(torch.randn(2, 3, 8))
    (l3(l2(h) + b(a(h)))).sum().backward()
    hand = (2 * 6 * 8 * 16          # l1: forward only (frozen, input needs no gradient)
            + 2 * 6 * 16 * 16       # l2: forward only
            + 2 * 6 * 16 * 2 * 2    # A: forward + weight gradient (its input needs none)
            + 2 * 6 * 2 * 16 * 3    # B: forward + input gradient + weight gradient
            + 2 * 6 * 16 * 4 * 2)   # l3: forward + input gradient (frozen weight)
    assert counter.total == hand == 8064
    with torch.no_grad():  # evaluation is not training: not counted
        l1(torch.randn(4, 8))
    assert counter.total == hand


def test_flop_counter_agrees_with_torch_on_a_tiny_bert_step():
    """An independent count: torch's FlopCounterMode sees every matmul that ran (eager attention included) on a
    LoRA training step; lorafit's hooks plus its attention formula must give the same total."""
    from torch.utils.flop_counter import FlopCounterMode

    from lorafit.adapters import attach_lora
    from lorafit.models import build_model

    cfg = compose(*TINY_CLS, "lora.target_modules=[query,key,value]", "model.attn_implementation=eager")
    model = attach_lora(build_model(cfg, ["a", "b", "c"]), cfg).train()
    counter = FlopCounter(model)
    batch = {"input_ids": torch.randint(5, 500, (3, 11)), "labels": torch.tensor([0, 1, 2])}
    with FlopCounterMode(display=False) as torch_count:
        model(**batch).loss.backward()
    counter.attention(batch)
    assert counter.total == torch_count.get_total_flops()
