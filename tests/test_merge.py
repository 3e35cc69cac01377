"""`python -m lorafit.merge`: exact merges, streaming == in-memory, multi-adapter, tied embeddings, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CLS, TINY_LM, run_inprocess
from safetensors.torch import load_file


def merge_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafit.merge", *map(str, args)], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    a, _ = run_inprocess(root / "a", *TINY_LM, "train.max_steps=10", "hooks=[save_adapter]")
    b, _ = run_inprocess(root / "b", *TINY_LM, "train.max_steps=10", "train.seed=1", "hooks=[save_adapter]")
    return a, b


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merge_cli_seq_cls_keeps_head_and_labels(tmp_path, dtype):
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=10", "hooks=[save_adapter]")
    out = merge_cli(run_dir, "--out", tmp_path / "merged", "--dtype", dtype)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["max_abs_diff_merged_vs_unmerged"] <= report["tolerance"]
    if dtype == "fp32":
        assert report["max_abs_diff_merged_vs_unmerged"] < 1e-5
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def test_merge_cli_causal_lm_keeps_embeddings_tied(tmp_path, lm_runs):
    from transformers import AutoModelForCausalLM

    out = merge_cli(lm_runs[0], "--out", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["tied_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_streaming_merge_is_bitwise_equal_to_in_memory(tmp_path, lm_runs):
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    sharded = tmp_path / "base"  # the tiny base re-saved in several shards, like a big checkpoint
    AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(Path(resolve("tiny-llama")) / "tokenizer.json", sharded)
    shutil.copy(Path(resolve("tiny-llama")) / "tokenizer_config.json", sharded)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    adapter = lm_runs[0] / "adapter"
    assert merge_cli(adapter, "--base", sharded, "--out", tmp_path / "mem").returncode == 0
    out = merge_cli(adapter, "--base", sharded, "--out", tmp_path / "stream", "--stream")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "stream" / "merge_report.json").read_text())["max_abs_diff_module_probe"] < 1e-5
    mem = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").state_dict()
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert mem.keys() == streamed.keys()
    assert all(torch.equal(mem[k], streamed[k]) for k in mem), [k for k in mem if not torch.equal(mem[k], streamed[k])][:3]


def test_weighted_multi_adapter_merge_is_verified(tmp_path, lm_runs):
    out = merge_cli(*lm_runs, "--weights", "0.7", "0.3", "--out", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["weights"] == [0.7, 0.3] and report["max_abs_diff_merged_vs_unmerged"] < 1e-4
    assert report["combination"] == "sum" and report["max_abs_diff_merged_vs_weighted_sum"] < 1e-4  # Σ wᵢ·ΔWᵢ itself


def test_merge_rejects_mismatched_base_pickles_and_missing_files(tmp_path, lm_runs):
    adapter = lm_runs[0] / "adapter"
    out = merge_cli(adapter, "--base", "tiny-bert", "--out", tmp_path / "x")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "lorafit: error:" in out.stderr
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    out = merge_cli(pickled, "--out", tmp_path / "y")
    assert out.returncode == 2 and "pickle" in out.stderr and not (tmp_path / "y").exists()
    out = merge_cli(pickled, "--out", tmp_path / "y", "--allow-pickle")
    assert out.returncode == 0, out.stderr
    out = merge_cli(tmp_path / "nothing", "--out", tmp_path / "z")
    assert out.returncode == 2 and "no such adapter dir" in out.stderr


def test_compress_meets_eckart_young_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit import compress
    from lorafit.models import resolve

    out = subprocess.run([sys.executable, "-m", "lorafit.compress", "tiny-llama", "--out", tmp_path / "c", "--energy", "0.9"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "c" / "lowrank.json").read_text())
    factored = [e for e in plan["modules"].values() if e["factored"]]
    assert factored and plan["params_after"] < plan["params_before"]
    for e in factored:
        assert e["eckart_young_rel_error"] <= 0.1**0.5 + 1e-9  # keeping ≥ 90% of Σσ² leaves ≤ √0.1 relative error
        assert e["measured_rel_error"] == pytest.approx(e["eckart_young_rel_error"], rel=1e-4)
        assert e["rank"] * sum(e["shape"]) < e["shape"][0] * e["shape"][1]  # only where it saves parameters
    reloaded = compress.load(tmp_path / "c")
    original = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    in_memory = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    compress.compress_model(in_memory, 0.9, None)
    x = torch.randint(5, 500, (2, 16))
    with torch.no_grad():
        a, b, c = reloaded(input_ids=x).logits, in_memory(input_ids=x).logits, original(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)
    for name, e in plan["modules"].items():  # the reloaded architecture follows the plan, module by module
        assert isinstance(reloaded.get_submodule(name), compress.LowRankLinear) == e["factored"], name
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert not reloaded.training and not compress.load(tmp_path / "c", dtype=torch.bfloat16).training  # inference-ready


def test_compress_fixed_rank_randomized_matches_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit import compress
    from lorafit.models import resolve

    model = lambda: AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    exact = compress.compress_model(model(), None, 8, "exact", modules=r"mlp\.")
    rand = compress.compress_model(model(), None, 8, "randomized", modules=r"mlp\.")
    assert set(exact["modules"]) == set(rand["modules"]) and all(e["rank"] == 8 for e in rand["modules"].values())
    for name, e in exact["modules"].items():
        assert rand["modules"][name]["measured_rel_error"] <= e["measured_rel_error"] * 1.05 + 1e-6


def test_merge_cli_plain_peft_adapter_on_a_base_without_tokenizer(tmp_path):
    """A base saved by `model.save_pretrained` alone and an adapter saved by plain peft: the merge needs weights
    only (it verifies on random token ids then), and the merged model is the adapter's function."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).save_pretrained(base_dir)
    assert not list(base_dir.glob("tokenizer*"))
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(adapter_dir)
    out = merge_cli(adapter_dir, "--out", tmp_path / "merged")
    assert out.returncode == 0, out.stderr
    x = torch.randint(5, 500, (2, 12))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        a, b = reloaded(input_ids=x).logits, merged(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, peft_model.get_base_model()(input_ids=x).logits * 0)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run_dir, _ = run_inprocess(tmp_path_factory.mktemp("cls"), *TINY_CLS, "train.max_steps=10", "hooks=[save_adapter]")
    return run_dir


def test_streaming_merge_swaps_in_a_biased_head_bitwise(tmp_path, cls_run):
    """The trained classifier (weight and bias, saved in full with the adapter) lands in the right slots."""
    from transformers import AutoModelForSequenceClassification

    from lorafit.models import resolve

    sharded = tmp_path / "base"
    AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=3).save_pretrained(
        sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(resolve("tiny-bert")) / f, sharded)
    adapter = cls_run / "adapter"
    assert merge_cli(adapter, "--base", sharded, "--out", tmp_path / "mem").returncode == 0
    out = merge_cli(adapter, "--base", sharded, "--out", tmp_path / "stream", "--stream")
    assert out.returncode == 0, out.stderr
    mem = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mem").state_dict()
    streamed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "stream").state_dict()
    assert mem.keys() == streamed.keys()
    assert all(torch.equal(mem[k], streamed[k]) for k in mem), [k for k in mem if not torch.equal(mem[k], streamed[k])][:3]
    saved = load_file(adapter / "adapter_model.safetensors")
    bias = next(v for k, v in saved.items() if k.endswith("classifier.bias"))
    assert torch.equal(streamed["classifier.bias"], bias) and streamed["classifier.weight"].shape == (3, 64)


def test_streaming_merge_probe_checks_against_peft_not_its_own_factors(tmp_path, lm_runs, monkeypatch):
    """The probe compares each merged module with peft's own LoRA layer around W0: a merge that gets the scale
    wrong (here: twice alpha/r) fails it, though W·x = W0·x + s·B·(A·x) holds for the wrong s. Nothing is saved."""
    from lorafit import merge
    from lorafit.analysis import spectrum
    from lorafit.errors import UserError
    from lorafit.models import resolve

    right = merge.stream_merge(Path(resolve("tiny-llama")), lm_runs[0] / "adapter", tmp_path / "ok")
    assert right["max_abs_diff_module_probe"] < 1e-5 and right["merged_modules"] == 14
    real_scale = spectrum._scale
    monkeypatch.setattr(spectrum, "_scale", lambda *a: 2 * real_scale(*a))
    with pytest.raises(UserError, match="merge check failed"):
        merge.stream_merge(Path(resolve("tiny-llama")), lm_runs[0] / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_multi_adapter_merge_of_seq_cls_heads_is_refused_in_one_line(tmp_path, cls_run):
    out = merge_cli(cls_run, cls_run, "--out", tmp_path / "merged")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "merge one adapter at a time" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "merged").exists()


def test_qlora_merge_cli_rebuilds_the_base_the_run_trained_on(tmp_path):
    """lorafit.json carries the full quant and model config: the CLI re-quantizes exactly as the run did
    (here without double quant), so its merge equals the in-run merge."""
    from transformers import AutoModelForCausalLM

    run_dir, _ = run_inprocess(tmp_path, *TINY_LM, "quant=nf4", "quant.double_quant=false", "quant.compute_dtype=float32",
                               "train.max_steps=5", "hooks=[save_adapter,merge]")
    info = json.loads((run_dir / "adapter" / "lorafit.json").read_text())
    assert info["quant"]["double_quant"] is False and info["model"]["dtype"] == "float32"
    out = merge_cli(run_dir, "--out", tmp_path / "cli")
    assert out.returncode == 0, out.stderr
    hook = AutoModelForCausalLM.from_pretrained(run_dir / "merged").state_dict()
    cli = AutoModelForCausalLM.from_pretrained(tmp_path / "cli").state_dict()
    assert all(torch.equal(hook[k], cli[k]) for k in hook), [k for k in hook if not torch.equal(hook[k], cli[k])][:3]


def test_merge_must_match_the_trained_model_or_nothing_is_saved(tmp_path, lm_runs):
    """merged vs trained is enforced, not only recorded: a reference that computes something else is refused."""
    from transformers import AutoModelForCausalLM

    from conftest import compose
    from lorafit.errors import UserError
    from lorafit.merge import merge_and_verify, merge_base
    from lorafit.models import resolve

    cfg = compose(*TINY_LM)
    probe = {"input_ids": torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))}
    other = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))  # the base alone: not what was trained
    with pytest.raises(UserError, match="the merged model and the trained model differ"):
        merge_and_verify(merge_base(cfg, None, "fp32"), [lm_runs[0] / "adapter"], tmp_path / "m", probe, cfg,
                         reference=other)
    assert not (tmp_path / "m").exists()


def gguf_matches_merged(merged_dir: Path, qtype: str) -> float:
    """Max |logit diff| of transformers' GGUF reader on merged_dir/model-QTYPE.gguf vs the merged HF model,
    relative to the logits' scale; the GGUF's own tokenizer must encode as the HF one does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice in the final."]
    tok, tok_gguf = (AutoTokenizer.from_pretrained(merged_dir, **kw) for kw in ({}, {"gguf_file": f"model-{qtype}.gguf"}))
    assert tok_gguf(text)["input_ids"] == tok(text)["input_ids"]
    import gguf

    fields = gguf.GGUFReader(merged_dir / f"model-{qtype}.gguf").fields  # llama.cpp's chat needs the template
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    ids = tok(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged_dir)(**ids).logits
        out = AutoModelForCausalLM.from_pretrained(merged_dir, gguf_file=f"model-{qtype}.gguf")(**ids).logits
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize(("qtype", "bound"), [("f16", 1e-2), ("q8_0", 3e-2)])
def test_gguf_export_reads_back_with_the_merged_logits(tmp_path, lm_runs, qtype, bound):
    out = merge_cli(lm_runs[0], "--out", tmp_path / "m", "--gguf", qtype)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())["gguf"]
    assert report["tensors"] == ({"F16": 15, "F32": 5} if qtype == "f16" else {"Q8_0": 15, "F32": 5})  # tied head left out
    assert gguf_matches_merged(tmp_path / "m", qtype) <= bound


def test_gguf_export_refuses_what_it_does_not_write(tmp_path, cls_run):
    out = merge_cli(cls_run, "--out", tmp_path / "m", "--gguf", "f16")
    assert out.returncode == 2 and "--gguf exports llama, mistral, qwen2, qwen3" in out.stderr and "Traceback" not in out.stderr
    from conftest import compose

    from lorafit.config import validate
    from lorafit.errors import UserError

    with pytest.raises(UserError, match=r"hooks.merge.gguf=f16 exports llama, .* causal LMs; tiny-bert \(bert, seq_cls\) is not one"):
        validate(compose(*TINY_CLS, "hooks=[merge]", "hooks.merge.gguf=f16"))
