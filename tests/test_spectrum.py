"""The exact ΔW spectrum from r×r cores, against a full float64 SVD of the formed matrix."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.analysis.spectrum import (effective_rank, energy_rank, lora_factors, lowrank_svd, spectrum_metrics)


@pytest.mark.parametrize("d,k,r", [(64, 64, 8), (128, 32, 4), (16, 300, 16), (50, 70, 1)])
def test_singular_values_and_vectors_match_full_svd(d, k, r):
    g = torch.Generator().manual_seed(d * k + r)
    B, A, s = torch.randn(d, r, generator=g), torch.randn(r, k, generator=g), 0.37
    S, U, V = lowrank_svd(B, A, s, vectors=True)
    full = s * B.double() @ A.double()
    S_ref = torch.linalg.svdvals(full)
    assert torch.allclose(S, S_ref[:r], rtol=1e-10, atol=1e-10)
    assert torch.allclose(S_ref[r:], torch.zeros(()).double(), atol=1e-9)  # rank ≤ r
    assert torch.allclose(U @ torch.diag(S) @ V.T, full, atol=1e-9)  # vectors reconstruct ΔW
    assert torch.allclose(U.T @ U, torch.eye(r).double(), atol=1e-10) and torch.allclose(V.T @ V, torch.eye(r).double(), atol=1e-10)


def _state(shapes: dict[str, tuple[int, int, int]], seed=0):
    g, state = torch.Generator().manual_seed(seed), {}
    for name, (d, k, r) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, k, generator=g)
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d, r, generator=g)
    return state


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_follows_peft_alpha_rslora_and_patterns(rslora):
    shapes = {"layers.0.q_proj": (32, 32, 8), "layers.0.v_proj": (32, 32, 4), "layers.1.q_proj": (32, 32, 8)}
    config = {"r": 8, "lora_alpha": 16, "use_rslora": rslora, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"layers.1.q_proj": 4}}
    factors, skipped = lora_factors(config, _state(shapes))
    assert not skipped and [f.name for f in factors] == list(shapes)
    norm = (lambda r: math.sqrt(r)) if rslora else (lambda r: r)
    assert [f.scale for f in factors] == pytest.approx([16 / norm(8), 16 / norm(4), 4 / norm(8)])
    for f in factors:  # the spectrum is of the *scaled* ΔW
        ref = torch.linalg.svdvals(f.scale * f.B.double() @ f.A.double())[: f.rank]
        assert torch.allclose(lowrank_svd(f.B, f.A, f.scale), ref, rtol=1e-9)


def test_peft_delta_weight_agrees_including_fan_in_fan_out():
    """Against peft's own get_delta_weight on a GPT-2 style Conv1D layer (weights stored transposed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    from peft.utils import get_peft_model_state_dict

    config = peft_model.peft_config["default"].to_dict()
    (f,), _ = lora_factors(config, get_peft_model_state_dict(peft_model))
    ref = torch.linalg.svdvals(layer.get_delta_weight("default").double())[:4]
    assert torch.allclose(lowrank_svd(f.B, f.A, f.scale), ref, rtol=1e-5)


def test_rank_metrics_on_known_spectra():
    flat = torch.ones(8)
    assert energy_rank(flat, 0.9) == 8 and energy_rank(flat, 0.5) == 4 and energy_rank(flat, 0.99) == 8
    assert effective_rank(flat) == pytest.approx(8.0)
    one = torch.tensor([3.0, 0, 0, 0])
    assert energy_rank(one, 0.99) == 1 and effective_rank(one) == pytest.approx(1.0)
    m = spectrum_metrics(torch.tensor([4.0, 2.0, 1.0, 0.2]))
    assert m["fro_norm"] == pytest.approx(math.sqrt(16 + 4 + 1 + 0.04)) and m["spectral_norm"] == 4.0
    assert m["stable_rank"] == pytest.approx(21.04 / 16)
    assert (m["r90"], m["r95"], m["r99"]) == (2, 2, 3)  # cumulative energy 16, 20, 21, 21.04 of 21.04: 0.76, 0.951, 0.998
    assert m["elbow_rank"] == 3  # 0.2/4 = 0.05 < 0.1
    assert m["condition"] == pytest.approx(20.0)
    assert spectrum_metrics(torch.tensor([1.0, 0.0]))["condition"] is None


def test_zero_update_is_reported_not_crashed():
    m = spectrum_metrics(torch.zeros(4))
    assert (m["r90"], m["effective_rank"], m["stable_rank"]) == (0, 0.0, 0.0)
