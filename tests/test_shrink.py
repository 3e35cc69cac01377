"""`python -m lorafit.shrink`: exact Eckart–Young truncation of every ΔW, as a plain PEFT adapter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CLS, run_inprocess

from lorafit.shrink import shrink


def random_adapter(path, use_rslora=False, use_dora=False):
    """A tiny-llama LoRA adapter with random (non-zero) B, saved with plain peft: no training needed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                            use_rslora=use_rslora, use_dora=use_dora, task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    return path


def deltas(adapter) -> dict[str, torch.Tensor]:
    """Dense ΔW = s·B·A of every module, in float64 (what shrink never forms)."""
    from lorafit.analysis.spectrum import lora_factors, read_adapter

    factors, _ = lora_factors(*read_adapter(adapter))
    return {f.name: f.scale * f.B.double() @ f.A.double() for f in factors}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_shrink_drops_exactly_the_tail_energy_and_loads_in_peft(tmp_path, use_rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    src = random_adapter(tmp_path / "a", use_rslora)
    report = shrink(src, tmp_path / "s", energy=0.8)
    before, after = deltas(src), deltas(tmp_path / "s")
    ks = {m["name"]: m["k"] for m in report["modules"]}
    assert 1 < min(ks.values()) and max(ks.values()) < 8  # a real truncation, per module
    for m in report["modules"]:
        err = float(((before[m["name"]] - after[m["name"]]) ** 2).sum())
        assert err == pytest.approx(m["tail_energy"], rel=1e-5, abs=1e-9)  # ‖ΔW − ΔW'‖²_F = Σ dropped σ²
        # ... and it is the dense SVD's own truncation (Eckart–Young's best rank-k approximation)
        U, S, Vh = torch.linalg.svd(before[m["name"]])
        k = m["k"]
        assert torch.allclose(after[m["name"]], U[:, :k] * S[:k] @ Vh[:k], atol=1e-5 * float(S[0]))
        assert float((S[k:] ** 2).sum()) == pytest.approx(m["tail_energy"], rel=1e-5, abs=1e-9)
    # plain peft loads it, and computes W0 + the dense-SVD truncation
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")), tmp_path / "s").eval()
    dense = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).eval()
    with torch.no_grad():
        for name, d in after.items():
            dense.get_submodule(name).weight += d.float()
        a, b = model(input_ids=ids).logits, dense(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())


def test_shrink_to_a_rank_keeps_the_head_and_labels(tmp_path):
    from peft import PeftModel

    from lorafit.analysis.spectrum import read_adapter

    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=10", "lora.r=8", "hooks=[save_adapter]")
    out = subprocess.run([sys.executable, "-m", "lorafit.shrink", str(run_dir), "--rank", "2", "--out", str(tmp_path / "s")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LoRA parameters (25.0%)" in out.stdout
    config, state = read_adapter(tmp_path / "s")
    _, old = read_adapter(run_dir)
    assert set(config["rank_pattern"].values()) == {2}
    heads = [k for k in old if "classifier" in k]
    assert heads and all(torch.equal(state[k], old[k]) for k in heads)  # the trained head goes over unchanged
    assert json.loads((tmp_path / "s" / "lorafit.json").read_text())["labels"] == ["business", "sport", "tech"]
    from lorafit.generate import load

    assert isinstance(load(tmp_path / "s").model, PeftModel)  # loads back on its base, through lorafit.json


def test_shrink_refuses_dora_in_one_line(tmp_path):
    src = random_adapter(tmp_path / "d", use_dora=True)
    out = subprocess.run([sys.executable, "-m", "lorafit.shrink", str(src), "--energy", "0.9", "--out", str(tmp_path / "s")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "shrink handles plain LoRA" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "s").exists()


def test_shrink_intruders_dampens_them_through_peft(tmp_path):
    """--intruders 0: peft's reduce_intruder_dimension removes the intruder directions; modules without any keep
    their factors, and the result loads with plain peft and has fewer intruders."""
    from lorafit.analysis import base as base_weights
    from lorafit.analysis.report import analyze
    from lorafit.analysis.spectrum import read_adapter
    from lorafit.shrink import dampen_intruders

    src = random_adapter(tmp_path / "a")
    config, state = read_adapter(src)
    config["lora_alpha"] = 4  # some modules with intruders, some without (see test_intruders)
    (src / "adapter_config.json").write_text(json.dumps(config))
    before = analyze(config, state, base=base_weights.from_dir("tiny-llama"))
    report = dampen_intruders(src, tmp_path / "d", lam=0.0)
    assert report["intruders"] == {m["name"]: m["intruder_count"] for m in before["modules"]}
    new_config, new_state = read_adapter(tmp_path / "d")
    after = analyze(new_config, new_state, base=base_weights.from_dir("tiny-llama"))
    assert after["intruders"]["total"] < before["intruders"]["total"]
    clean = [n for n, c in report["intruders"].items() if c == 0]
    assert clean and all(torch.equal(new_state[k], state[k]) for k in state if any(f"{n}.lora_" in k for n in clean))


def test_shrink_intruders_keeps_a_trained_classifier_head(tmp_path):
    """On a seq_cls adapter, peft's new (dampened) adapter would start its modules_to_save head from the base's
    fresh one; the trained head is put back. At lambda 1 (intruders kept) the result then gives the original
    adapter's logits, through plain peft."""
    from conftest import TINY_CLS, run_inprocess
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lorafit.analysis.spectrum import read_adapter
    from lorafit.models import resolve
    from lorafit.shrink import dampen_intruders

    run_dir, _ = run_inprocess(tmp_path / "run", *TINY_CLS, "train.max_steps=6", "hooks=[save_adapter]")
    adapter = run_dir / "adapter"
    dampen_intruders(adapter, tmp_path / "d", lam=1.0)
    _, state = read_adapter(adapter)
    _, new = read_adapter(tmp_path / "d")
    heads = [k for k in state if ".lora_" not in k]
    assert heads and all(torch.equal(new[k], state[k]) for k in heads)
    n_labels = next(v.shape[0] for k, v in state.items() if k.endswith("classifier.weight"))
    ids = torch.randint(5, 900, (3, 11), generator=torch.Generator().manual_seed(0))

    def logits(path):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=n_labels)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, path).eval()(input_ids=ids).logits

    original, dampened = logits(adapter), logits(tmp_path / "d")
    assert torch.allclose(dampened, original, atol=1e-4), (dampened - original).abs().max()
