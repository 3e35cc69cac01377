"""Model building: the cache is built once under concurrency, parameter counts hold for 4-bit storage."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from conftest import TINY_LM, compose


def _materialize_slowly(cache: str, marker: str) -> None:
    import os
    from pathlib import Path

    os.environ["LORAFIT_CACHE"] = cache
    from lorafit.models import _materialize

    def build(tmp: Path) -> None:
        with open(marker, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "config.json").write_text("{}")

    out = _materialize("slow-model", build)
    assert (out / "config.json").read_text() == "{}"


def test_concurrent_processes_build_a_cached_model_once(tmp_path):
    """The processes of a distributed run all resolve the same alias: one builds it, the others wait for it."""
    marker = tmp_path / "builds.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_materialize_slowly, args=(str(tmp_path / "cache"), str(marker))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert marker.read_text().count("built") == 1


def test_a_cached_model_built_from_another_recipe_is_rebuilt(tmp_path, monkeypatch):
    """A tiny model's cache dir records the config it was built from: when TINY_FAMILIES changes (tiny-qwen3-moe
    gained norm_topk_prob), the old dir is rebuilt rather than silently reused; the same recipe is built once."""
    from lorafit.models import TINY_FAMILIES, _materialize, resolve

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    builds = []

    def build(tmp):
        builds.append(1)
        (tmp / "config.json").write_text(str(len(builds)))

    for recipe in ("a", "a", "b", "b"):
        out = _materialize("m", build, recipe=recipe)
    assert len(builds) == 2 and (out / "config.json").read_text() == "2"
    assert (tmp_path / "models" / "m" / ".lorafit-recipe").read_text() == "b"
    tiny = tmp_path / "models" / "tiny-llama"
    assert resolve("tiny-llama") == str(tiny)
    assert (tiny / ".lorafit-recipe").read_text() == repr(TINY_FAMILIES["tiny-llama"])


@pytest.mark.parametrize("storage", [None, "bfloat16"])
def test_4bit_parameter_count_equals_the_float_models(storage):
    """A 4-bit weight holds 2 values per uint8, but 1 per element of a bfloat16 quant_storage (FSDP + QLoRA)."""
    from lorafit.adapters import attach_lora, parameter_report
    from lorafit.models import build_model

    extra = [f"quant.quant_storage={storage}"] if storage else []
    cfg = compose(*TINY_LM, "quant=nf4", *extra)
    quantized = parameter_report(attach_lora(build_model(cfg), cfg))
    float_cfg = compose(*TINY_LM)
    plain = parameter_report(attach_lora(build_model(float_cfg), float_cfg))
    assert quantized["total"] == plain["total"] and quantized["trainable"] == plain["trainable"] > 0


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gradient_checkpointing_gives_the_same_lora_gradients(quant):
    """model.gradient_checkpointing=true (plain and QLoRA) recomputes activations in backward, non-reentrant: the
    recomputation takes the forward's own code path (speed.attention picks its CPU kernel by grad mode), so under
    bf16 autocast the LoRA gradients equal those without checkpointing."""
    import torch

    from lorafit import speed
    from lorafit.adapters import attach_lora
    from lorafit.models import build_model

    ids = torch.randint(5, 900, (2, 19), generator=torch.Generator().manual_seed(0))
    grads = {}
    for ckpt in (False, True):
        cfg = compose(*TINY_LM, f"quant={quant}", f"model.gradient_checkpointing={str(ckpt).lower()}")
        torch.manual_seed(0)
        model = speed.install(attach_lora(build_model(cfg), cfg)).train()
        assert model.base_model.model.is_gradient_checkpointing == ckpt
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, rtol=1e-4, atol=1e-6), n
