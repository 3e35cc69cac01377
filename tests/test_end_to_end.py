"""The real packaged models through the real CLI: what `make run` does, shortened."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_default_minilm_on_bbc_news(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.models import resolve

    out = run_cli("train.max_steps=60", "train.eval_every=0", "hooks=[save_adapter,spectrum,merge]", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval"]["accuracy"] >= 0.7  # 60 steps, chance is 0.2; the full 150-step default reaches ~0.94
    assert "eval accuracy:" in out.stdout and str(tmp_path) in out.stdout  # the closing summary says where the run is
    # The first screen is lorafit's own: no library warnings about things the user can't change.
    import re

    assert not re.search(r"\w+Warning:", out.stderr) and "kernels-community" not in out.stderr, out.stderr[-2000:]
    # Plain peft on the packaged base reproduces the merged model, classifier head included.
    tok = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    batch = tok(["Shares in the bank rose after profits beat forecasts", "The striker scored twice in the final"],
                return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(resolve("minilm-l6"), num_labels=5)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        a, b = reloaded(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert [merged.config.id2label[int(i)] for i in b.argmax(-1)] == ["business", "sports"]
    spectrum = json.loads((tmp_path / "analysis" / "spectrum.json").read_text())
    assert len(spectrum["modules"]) == 12  # 6 layers x (query, value)
    assert all("base" in m for m in spectrum["modules"])  # the hook had W0 from the in-memory float model
    # The standalone verb on the same run, with the packaged base read lazily from its safetensors.
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "lorafit.analyze", str(tmp_path), "--base", "minilm-l6", "--out",
                          str(tmp_path / "an")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = json.loads((tmp_path / "an" / "spectrum.json").read_text())
    for a, b in zip(spectrum["modules"], again["modules"]):
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-9)
        assert a["base"]["uWv_fro"] == pytest.approx(b["base"]["uWv_fro"], rel=1e-5)
    for name in ("report.md", "singular_values.png", "cumulative_energy.png", "effective_rank.png"):
        assert (tmp_path / "an" / name).is_file()


def test_smollm2_causal_lm_runs_merges_and_exports_gguf(tmp_path):
    from test_merge import gguf_matches_merged

    out = run_cli("recipe=smollm2_bbc", "train.max_steps=3", "data.max_length=64", "data.eval_size=8",
                  "data.max_train_samples=64", "hooks=[save_adapter,merge]", "hooks.merge.gguf=f16",
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 1 < summary["eval"]["perplexity"] < 200  # a real pretrained LM on news text, not a random one
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-3
    assert summary["merge"]["gguf"]["tokenizer_pre"] == "smollm"  # llama.cpp's name for SmolLM's pre-tokenizer
    assert gguf_matches_merged(tmp_path / "merged", "f16") <= 1e-2  # transformers reads the file back
    # ... and llama.cpp itself runs it: its own tokens, the merged model's logits
    from test_gguf_llama_cpp import TEXT, llama_cpp_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(TEXT)["input_ids"]
    got, own, _ = llama_cpp_logits(tmp_path / "merged" / "model-f16.gguf", ids)
    assert own == ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(torch.tensor([ids]))
    assert np.abs(got - ref.logits[0].numpy()).max() / np.abs(ref.logits[0].numpy()).max() <= 1e-2
