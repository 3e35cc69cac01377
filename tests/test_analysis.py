"""The full analysis: DoRA, embeddings, W0-aware metrics, φ, the rank advisor, the CLI."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CLS, compose, run_inprocess
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from lorafit.analysis import base as base_weights
from lorafit.analysis.report import analyze
from lorafit.analysis.spectrum import (EXACT_SVD_MAX_DIM, base_metrics, energy_rank, lowrank_svd,
                                       subspace_similarity)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 24)
        self.proj = torch.nn.Linear(24, 32)

    def forward(self, x):
        return self.proj(self.emb(x))


def _peft(**kw):
    torch.manual_seed(0)
    model = Tiny()
    w0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    with torch.no_grad():  # DoRA starts with m = ‖W0‖_row; move it so the magnitude matters too
        for n, p in pm.named_parameters():
            if "magnitude" in n:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return pm, w0


def _effective_delta(pm, w0, name):
    merged = pm.merge_and_unload()
    return dict(merged.named_modules())[name].weight.detach().double() - w0[name].double()


def test_dora_spectrum_is_exact_with_the_base():
    pm, w0 = _peft(target_modules=["proj"], use_dora=True)
    config, state = pm.peft_config["default"].to_dict(), get_peft_model_state_dict(pm)
    doc = analyze(config, state, base=base_weights.from_model(pm))
    (m,) = doc["modules"]
    assert m["dora"] == "exact"
    ref = torch.linalg.svdvals(_effective_delta(pm, w0, "proj"))
    assert torch.allclose(torch.tensor(m["singular_values"], dtype=torch.float64), ref, rtol=1e-5, atol=1e-7)
    # Without W0 the same adapter is flagged: only the directional low-rank part is known.
    assert analyze(config, state)["modules"][0]["dora"] == "direction-only"


def test_embedding_lora_spectrum_matches_peft():
    pm, w0 = _peft(target_modules=["emb", "proj"])
    doc = analyze(pm.peft_config["default"].to_dict(), get_peft_model_state_dict(pm))
    kinds = {m["name"]: m["kind"] for m in doc["modules"]}
    assert kinds == {"emb": "embedding", "proj": "linear"} and not doc["skipped"]
    emb = next(m for m in doc["modules"] if m["name"] == "emb")
    ref = torch.linalg.svdvals(_effective_delta(pm, w0, "emb"))[:4]
    assert torch.allclose(torch.tensor(emb["singular_values"], dtype=torch.float64), ref, rtol=1e-5)


def test_phi_is_one_for_identical_and_about_r_over_d_for_random():
    g = torch.Generator().manual_seed(0)
    d, r = 1024, 8
    U1 = lowrank_svd(torch.randn(d, r, generator=g), torch.randn(r, 64, generator=g), vectors=True)[1]
    U2 = lowrank_svd(torch.randn(d, r, generator=g), torch.randn(r, 64, generator=g), vectors=True)[1]
    assert torch.allclose(subspace_similarity(U1, U1), torch.ones(r, r, dtype=torch.float64), atol=1e-10)
    phi = subspace_similarity(U1, U2)
    assert 0.3 * r / d < phi[-1, -1] < 3 * r / d  # E φ(r, r) = r/d for random r-dim subspaces of R^d
    # A rank-4 adapter inside a rank-8 one: φ(i ≤ 4, 8) = 1 however the smaller one is rotated.
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    assert torch.allclose(subspace_similarity(U1[:, :4] @ Q, U1)[:, -1], torch.ones(4, dtype=torch.float64), atol=1e-10)


def test_base_metrics_exact_and_randomized():
    g = torch.Generator().manual_seed(0)
    for n in (256, EXACT_SVD_MAX_DIM + 76):  # the exact path, then the randomized one
        sig = torch.cat([torch.linspace(10, 1, 20), torch.zeros(n - 20)]).double()
        Uw = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
        Vw = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
        W0 = (Uw * sig) @ Vw.T
        m = base_metrics(W0, delta_fro=2.0, U=Uw[:, :4], V=Vw[:, :4])  # ΔW along W0's own top directions
        energy = torch.cumsum(sig**2, 0) / (sig**2).sum()
        assert m["w0_r90"] == int((energy < 0.9 - 1e-12).sum()) + 1 and m["w0_spectrum_exact"] == (n <= EXACT_SVD_MAX_DIM)
        assert m["uWv_fro"] == pytest.approx(m["uWv_fro_w0_top"], rel=1e-6) == float(sig[:4].norm())
        assert m["uWv_fro_random"] < 0.5 * m["uWv_fro"]
        assert m["delta_over_w0"] == pytest.approx(2.0 / float(sig.norm())) and m["amplification"] == pytest.approx(2.0 / m["uWv_fro"])


def test_advice_reproduces_the_energy_target_and_parses_as_an_override(tmp_path):
    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=15", "hooks=[save_adapter,spectrum]")
    doc = json.loads((run_dir / "analysis" / "spectrum.json").read_text())
    target = doc["energy_target"]
    for m in doc["modules"]:
        e = torch.tensor(m["singular_values"], dtype=torch.float64) ** 2
        k = m["suggested_rank"]
        assert e[:k].sum() / e.sum() >= target - 1e-12  # Eckart–Young: the rank-k truncation keeps this much
        assert k == 1 or e[: k - 1].sum() / e.sum() < target  # ... and k is the smallest such rank
        assert k == energy_rank(e.sqrt(), target)
    # The advice is a working override: peft builds exactly these ranks from it.
    from lorafit.adapters import attach_lora
    from lorafit.models import build_model

    cfg = compose(*TINY_CLS, *shlex.split(doc["advice"]["override"]))
    model = attach_lora(build_model(cfg, ["a", "b", "c"]), cfg)
    for m in doc["modules"]:
        layer = model.base_model.model.get_submodule(m["name"])
        assert layer.lora_A["default"].weight.shape[0] == m["suggested_rank"], m["name"]
    assert doc["advice"]["params_rank_pattern"] == sum(m["suggested_rank"] * sum(m["shape"]) for m in doc["modules"])
    report = (run_dir / "analysis" / "report.md").read_text()
    assert doc["advice"]["override"] in report and "effective rank" in report
    for png in ("singular_values.png", "cumulative_energy.png", "effective_rank.png"):
        assert (run_dir / "analysis" / png).stat().st_size > 5000


def test_analyze_cli_on_a_run_dir_with_base_and_compare(tmp_path):
    a, _ = run_inprocess(tmp_path / "a", *TINY_CLS, "train.max_steps=8", "lora.r=8", "hooks=[save_adapter]")
    b, _ = run_inprocess(tmp_path / "b", *TINY_CLS, "train.max_steps=8", "lora.r=4", "train.seed=1", "hooks=[save_adapter]")
    out = subprocess.run([sys.executable, "-m", "lorafit.analyze", str(a), "--base", "tiny-bert", "--compare", str(b / "adapter"),
                          "--out", str(tmp_path / "an")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "advice: lora.r=" in out.stdout
    doc = json.loads((tmp_path / "an" / "spectrum.json").read_text())
    m = doc["modules"][0]
    assert m["base"]["w0_fro_norm"] > 0 and m["base"]["amplification"] > 0
    phi = m["phi"]["run"]
    assert len(phi) == 8 and len(phi[0]) == 4 and all(0 <= v <= 1 + 1e-9 for row in phi for v in row)
    assert (tmp_path / "an" / "phi_run.png").is_file()


@pytest.mark.parametrize("make_bad,needle", [
    (lambda d: None, "no such adapter dir"),
    (lambda d: d.mkdir(), "not a PEFT adapter"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{oops")), "corrupt JSON"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{}"), (d / "adapter_model.safetensors").write_bytes(b"garbage")),
     "corrupt safetensors"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{}"), torch.save({}, d / "adapter_model.bin")), "pickle"),
])
def test_analyze_cli_rejects_bad_adapters_in_one_line(tmp_path, make_bad, needle):
    bad = tmp_path / "adapter"
    make_bad(bad)
    out = subprocess.run([sys.executable, "-m", "lorafit.analyze", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr
