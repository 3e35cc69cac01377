"""Every model family lorafit lists, through the real CLI: a tiny random model of each (lorafit.models.TINY_FAMILIES)
trains with lora.target_modules=all-linear, its merge is verified, the adapter reloads in plain peft with the merged
model's logits, QLoRA nf4 trains and merges (decoders), and generate, shrink and analyze --base run on the result."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import CLS_EVAL, CLS_TRAIN, KEYWORDS, run_cli

# What all-linear must reach in each family (the leaf names of the Linear modules peft wraps): every projection of
# attention and MLP, fused ones included; never the head, which seq_cls trains in full and causal LMs leave tied or
# frozen. On an MoE, peft 0.21 maps all-linear to what it meant before transformers 5 fused the experts: the
# attention, the router (`gate`) and every expert, as target_parameters on the 3-D expert tensors (peft nests one
# wrapper per tensor: `experts` and `experts.base_layer`; gate_up_proj at rank 2r, being two fused projections).
LLAMA_LIKE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = {
    "tiny-llama": LLAMA_LIKE, "tiny-mistral": LLAMA_LIKE, "tiny-qwen2": LLAMA_LIKE, "tiny-qwen3": LLAMA_LIKE,
    "tiny-gemma2": LLAMA_LIKE, "tiny-gemma3": LLAMA_LIKE,
    "tiny-qwen3-moe": {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts", "base_layer"},
    "tiny-phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "tiny-bert": {"query", "key", "value", "dense"},
    "tiny-roberta": {"query", "key", "value", "dense"},
    "tiny-deberta-v2": {"query_proj", "key_proj", "value_proj", "dense"},
    "tiny-modernbert": {"Wqkv", "Wo", "Wi"},  # head.dense is the head's: trained in full
}
DECODERS = [n for n in TARGETS if n not in ("tiny-bert", "tiny-roberta", "tiny-deberta-v2", "tiny-modernbert")]
ENCODERS = [n for n in TARGETS if n not in DECODERS]
HEADS = ("lm_head", "score", "classifier")
# A classifier's head, trained in full and saved with the adapter: everything outside the pretrained body. DeBERTa-v3
# checkpoints have no pooler weights, so left frozen it would stay random and be drawn anew at every reload.
SAVED_IN_FULL = {"tiny-bert": {"classifier"}, "tiny-roberta": {"classifier"}, "tiny-deberta-v2": {"pooler", "classifier"},
                 "tiny-modernbert": {"head", "classifier"}}


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    """The keyword-topic task as chat rows: the assistant names the topic."""
    import csv

    root, paths = tmp_path_factory.mktemp("sft"), []
    for src in (CLS_TRAIN, CLS_EVAL):
        rows = list(csv.DictReader(open(src)))
        path = root / f"{src.stem}.jsonl"
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["text"]},
                                                         {"role": "assistant", "content": r["label"]}]}) + "\n"
                                for r in rows))
        paths.append(path)
    return paths


def _args(name: str, sft_files) -> list[str]:
    common = [f"model={name}", "train.mixed_precision=no", "lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear",
              "data.max_length=48", "train.batch_size=4", "train.eval_every=0", "train.log_every=1", "train.lr=1e-2"]
    if name in ENCODERS:
        return common + ["data=files", f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}"]
    return common + ["data=sft", f"data.train_file={sft_files[0]}", f"data.eval_file={sft_files[1]}"]


def _probe(tok):
    words = " ".join(random.Random(1).sample(sum((v.split() for v in KEYWORDS.values()), []), 6))
    return tok([words, "the match of the bank"], return_tensors="pt", padding=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_family_trains_merges_reloads_and_runs_every_verb(name, sft_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lorafit import analyze, generate, shrink
    from lorafit.models import auto_class, resolve

    run = tmp_path / "run"
    out = run_cli(*_args(name, sft_files), "train.max_steps=6", "hooks=[save_adapter,spectrum,merge]",
                  f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    # What got LoRA is what the adapter holds factors for (peft's config lists a head's Linears it then skips).
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    wrapped = {k.split(".lora_A")[0] for k in saved if ".lora_A" in k}
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == TARGETS[name], sorted(wrapped)
    assert not any(f".{h}" in w for w in wrapped for h in HEADS)
    in_full = {k.removeprefix("base_model.model.").split(".")[0] for k in saved if ".lora_" not in k}
    assert in_full == SAVED_IN_FULL.get(name, set()), in_full

    # Plain peft on the base rebuilds the merged model: a missed module (a head left random and frozen, a layer
    # peft wraps but merge skips) would show here.
    task = "seq_cls" if name in ENCODERS else "causal_lm"
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    kwargs = {"num_labels": 3} if task == "seq_cls" else {}
    reloaded = PeftModel.from_pretrained(auto_class(task).from_pretrained(resolve(name), **kwargs), run / "adapter").eval()
    merged = auto_class(task).from_pretrained(run / "merged").eval()
    batch = _probe(tok)
    with torch.no_grad():
        a, b = reloaded(**batch).logits, merged(**batch).logits
    keep = batch["attention_mask"].bool() if task == "causal_lm" else slice(None)
    assert (a[keep] - b[keep]).abs().max() < 1e-4

    replies = generate.main([str(run), "--prompt", "match goal striker", "--max-new-tokens", "3"])
    assert len(replies) == 1
    if name == "tiny-qwen3-moe":  # peft stores one rank for all experts of a tensor: refused, in one line
        with pytest.raises(SystemExit):
            shrink.main([str(run), "--rank", "1", "--out", str(tmp_path / "shrunk")])
        assert not (tmp_path / "shrunk").exists()
    else:
        report = shrink.main([str(run), "--rank", "1", "--out", str(tmp_path / "shrunk")])
        assert report["params_kept"] < report["params"]
    analyzed = analyze.main([str(run), "--base", name, "--no-plots", "--out", str(tmp_path / "an")])
    spectrum = json.loads((analyzed / "spectrum.json").read_text())
    experts = [m for m in spectrum["modules"] if m["kind"] == "expert"]
    assert spectrum["modules"] and all("base" in m for m in spectrum["modules"])  # experts: W0 is the expert's slice
    if name == "tiny-qwen3-moe":  # each expert's own ΔW, all of them trained: 2 layers x 2 tensors x 4 experts
        assert len(experts) == 16 and all(m["fro_norm"] > 0 for m in experts)
        assert {m["type"] for m in experts} == {"gate_up_proj", "down_proj"}
        _experts_match_peft(reloaded, run)
    else:
        assert not experts


def _experts_match_peft(model, run):
    """The spectrum's per-expert ΔW_e (spectrum.expert_factors) is peft's own, expert by expert, scale included
    (gate_up_proj has rank and alpha 2r, 2·alpha through peft's rank/alpha patterns)."""
    from lorafit.analysis.spectrum import lora_factors, read_adapter

    ours = {f.name: f for f in lora_factors(*read_adapter(run))[0]}
    wrappers = [(n, m) for n, m in model.named_modules() if getattr(m, "parameter_name", None) in ("gate_up_proj", "down_proj")]
    assert len(wrappers) == 4
    for n, m in wrappers:
        delta = m.get_delta_weight("default").float()
        container = n.removeprefix("base_model.model.").split(".base_layer")[0]
        for e in range(m.num_experts):
            f = ours[f"{container}.{m.parameter_name}.expert{e}"]
            assert torch.allclose(f.scale * f.B @ f.A, delta[e], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_family_qlora_nf4_trains_and_merges(name, sft_files, tmp_path):
    out = run_cli(*_args(name, sft_files), "quant=nf4", "train.max_steps=2", "hooks=[save_adapter,merge]",
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("targets", [
    ["lora.target_modules=[q_proj]", "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"],
    ["lora.target_modules=[q_proj]", "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]",
     "lora.r_expert=1"],
    ["lora.target_modules=all-linear", "lora.r_expert=1"],
], ids=["target_parameters", "r_expert", "all-linear+r_expert"])
def test_moe_experts_get_the_rank_asked_and_every_expert_trains(targets, sft_files, tmp_path):
    """lora.target_parameters and lora.r_expert on tiny-qwen3-moe: each expert tensor holds factors for all 4 experts
    at the rank asked (gate_up_proj, fused, at 2·r_expert), every expert's ΔW is nonzero after training, the merge is
    exact, and the spectrum's per-expert ΔW is peft's own, scale included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    # 12 steps: layer 1's frozen router rarely picks expert 2; at 6 it had sent it no token yet (its ΔW still 0), at
    # 8 it had: margin for other CPUs' rounding
    run = tmp_path / "run"
    out = run_cli(*_args("tiny-qwen3-moe", sft_files), *targets, "train.max_steps=12", "hooks=[save_adapter,merge]",
                  f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MoE: LoRA on 4 expert tensors" in out.stdout + out.stderr
    assert "RuntimeWarning" not in out.stderr
    assert json.loads((run / "summary.json").read_text())["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    r_expert = 1 if "lora.r_expert=1" in targets else 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("tiny-qwen3-moe")), run / "adapter")
    ranks = {}
    for n, m in model.named_modules():
        if getattr(m, "parameter_name", None) in ("gate_up_proj", "down_proj"):
            ranks[m.parameter_name] = m.lora_A["default"].weight.shape[0] // m.num_experts
            assert all(d.abs().sum() > 0 for d in m.get_delta_weight("default"))  # every expert trained
    fused = 2 * r_expert if "lora.r_expert=1" in targets or "all-linear" in targets[0] else r_expert
    assert ranks == {"gate_up_proj": fused, "down_proj": r_expert}
    _experts_match_peft(model, run)


def test_moe_without_expert_targets_says_so(sft_files, tmp_path):
    """LoRA on attention only, on an MoE: a warning names it (the silent no-op on experts), and target_parameters
    that match nothing are refused in one line."""
    out = run_cli(*_args("tiny-qwen3-moe", sft_files), "lora.target_modules=[q_proj,v_proj]", "train.max_steps=1",
                  "hooks=[]", f"hydra.run.dir={tmp_path / 'a'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MoE: no expert of tiny-qwen3-moe has a LoRA adapter" in out.stdout + out.stderr
    out = run_cli(*_args("tiny-qwen3-moe", sft_files), "lora.target_modules=[q_proj]",
                  "lora.target_parameters=[mlp.experts.w1]", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'b'}")
    assert out.returncode == 2
    assert "'mlp.experts.w1' match no parameter of tiny-qwen3-moe; its 3-D (expert) parameters: " \
           "mlp.experts.down_proj, mlp.experts.gate_up_proj" in out.stderr
    assert "Traceback" not in out.stderr  # refused before the model loads: only Hydra's own bookkeeping is written
    assert {p.name for p in (tmp_path / "b").iterdir()} <= {".hydra", "__main__.log"}


def test_rank_auto_or_dropout_on_moe_experts_is_refused_in_one_line(sft_files, tmp_path):
    """lora.r=auto shrinks each adapter by one SVD of B·A; an expert tensor's factors hold one pair per expert, so
    that SVD would mix experts: refused before the model loads, naming the fix. So is dropout on experts (peft has
    none there), in its own words, not as "matches no Linear module"."""
    out = run_cli(*_args("tiny-qwen3-moe", sft_files), "lora.r=auto", "lora.r_max=8", "train.max_steps=1",
                  f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "lora.r=auto shrinks 2-D adapters" in out.stderr and "set an integer lora.r" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli(*_args("tiny-qwen3-moe", sft_files), "lora.dropout=0.1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "lora.dropout=0.1: peft trains MoE expert tensors" in out.stderr, out.stderr[-2000:]
