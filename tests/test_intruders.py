"""Intruder dimensions (Shuttleworth et al. 2024) in the analysis: exact, as peft counts them, and cached at scale."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO

from lorafit.analysis import spectrum
from lorafit.analysis.spectrum import intruder_dimensions


def _orthogonal(n: int, g) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def test_a_new_direction_is_an_intruder_and_a_boosted_old_one_is_not():
    g = torch.Generator().manual_seed(0)
    U0, V0 = _orthogonal(64, g), _orthogonal(64, g)
    W0 = U0 @ torch.diag(torch.logspace(0, -1, 64, dtype=torch.float64)) @ V0.T
    u = torch.randn(64, generator=g, dtype=torch.float64)
    u /= u.norm()  # a random direction: its largest |cos| with W0's basis is ~ sqrt(2 ln d / d) < 0.5
    assert float((U0.T @ u).abs().max()) < 0.5
    new = intruder_dimensions(W0, 5 * torch.outer(u, V0[:, 7]))
    assert new["count"] == 1 and new["positions"] == [0] and new["sigma"][0] > 4  # it tops W0 + ΔW's spectrum
    old = intruder_dimensions(W0, 5 * torch.outer(U0[:, 3], V0[:, 3]))  # W0's own 4th direction, amplified
    assert old["count"] == 0 and old["max_cos"][0] > 0.999


def test_counts_match_peft_reduce_intruder_dimension(tmp_path):
    """peft's own detector (reduce_intruder_dimension logs each layer's count) and lorafit's agree, module by module."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from test_shrink import random_adapter
    from transformers import AutoModelForCausalLM

    from lorafit.analysis import base as base_weights
    from lorafit.analysis.report import analyze
    from lorafit.analysis.spectrum import read_adapter
    from lorafit.models import resolve

    src = random_adapter(tmp_path / "a")
    config, state = read_adapter(src)
    config["lora_alpha"] = 4  # an update of a size where some modules get intruders and some do not
    (src / "adapter_config.json").write_text(json.dumps(config))
    doc = analyze(config, state, base=base_weights.from_dir("tiny-llama"))
    ours = {m["name"]: m["intruder_count"] for m in doc["modules"]}

    lines = []
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), src)
    reduce_intruder_dimension(model, logging_sink=lines.append)
    from lorafit.shrink import peft_intruder_counts

    theirs = peft_intruder_counts(lines)
    assert ours == theirs and 0 < sum(ours.values()) and min(ours.values()) == 0


def test_large_modules_use_a_randomized_top_k_and_a_cached_basis(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(1100, 1030, generator=g) / 40  # past EXACT_SVD_MAX_DIM: the scalable path
    B, A = torch.randn(1100, 4, generator=g), torch.randn(4, 1030, generator=g) / 30
    fast = intruder_dimensions(W0, B @ A, cache=tmp_path / "svd")
    (cached,) = (tmp_path / "svd").glob("*.safetensors")
    again = intruder_dimensions(W0, B @ A, cache=tmp_path / "svd")  # reads W0's basis back
    from safetensors.torch import load_file

    U = load_file(cached)["U"]
    assert U.shape == (1100, 1030) and U.dtype == torch.float16  # all of W0's left singular vectors
    assert again["count"] == fast["count"]
    assert max(abs(a - b) for a, b in zip(again["max_cos"], fast["max_cos"])) < 2e-3  # fp16 basis: cosines to ~1e-3
    monkeypatch.setattr(spectrum, "EXACT_SVD_MAX_DIM", 2048)  # the exact float64 route on the same matrices
    exact = intruder_dimensions(W0, B @ A)
    assert fast["count"] == exact["count"] >= 1
    assert max(abs(a - b) for a, b in zip(fast["max_cos"][:4], exact["max_cos"][:4])) < 1e-2


def test_analyze_cli_reports_intruders_with_a_base(tmp_path):
    from test_shrink import random_adapter

    src = random_adapter(tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "lorafit.analyze", str(src), "--base", "tiny-llama", "--intruder-k", "5",
                          "--out", str(tmp_path / "an")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "an" / "spectrum.json").read_text())
    assert doc["intruders"]["k"] == 5 and all(len(m["intruders"]["max_cos"]) == 5 for m in doc["modules"])
    assert f"intruder dimensions: {doc['intruders']['total']} in" in out.stdout
    assert "## Intruder dimensions" in (tmp_path / "an" / "report.md").read_text()
    assert (tmp_path / "an" / "intruders.png").is_file() and (tmp_path / "an" / "intruder_count.png").is_file()


def test_the_spectrum_hook_counts_intruders_unless_told_not_to(tmp_path):
    from conftest import TINY_CLS, run_inprocess

    run_dir, summary = run_inprocess(tmp_path / "on", *TINY_CLS, "train.max_steps=5", "hooks=[spectrum]",
                                     "hooks.spectrum.plots=false")
    doc = json.loads((run_dir / "analysis" / "spectrum.json").read_text())
    assert doc["intruders"]["modules"] == len(doc["modules"]) and all("intruder_count" in m for m in doc["modules"])
    off, _ = run_inprocess(tmp_path / "off", *TINY_CLS, "train.max_steps=5", "hooks=[spectrum]",
                           "hooks.spectrum.plots=false", "hooks.spectrum.intruders=false")
    assert "intruders" not in json.loads((off / "analysis" / "spectrum.json").read_text())
