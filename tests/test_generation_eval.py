"""eval.generate: replies generated at every evaluation, scored (exact match, ROUGE-L), kept and logged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compose, metrics_lines, run_inprocess

from lorafit.errors import UserError
from lorafit.metrics import generation

SFT = ["model=tiny-llama", "data=sft", "train.mixed_precision=no", "train.batch_size=4", "train.lr=3e-2",
       "lora.target_modules=all-linear", "hooks=[]", "train.log_every=1"]


def test_generation_scores_by_hand():
    out = generation(["the cat sat", " Four. ", "x"], ["the cat sat on the mat", "Four.", "y"])
    assert out["exact_match"] == pytest.approx(1 / 3)  # whitespace around a reply does not count
    # ROUGE-L F1: LCS 3 of 3 and 6 tokens -> 2/3; identical -> 1; nothing shared -> 0
    assert out["rouge_l"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_a_memorized_reply_is_generated_exactly_and_logged(tmp_path, write_jsonl, monkeypatch):
    """Trained on one prompt/reply, greedy generation from the eval prompt gives the reply: the prompt is built the
    way training rendered it, and the reply is cut at end of turn.

    The exact-output assertion is only meaningful if the memorization has a margin: every reply token must win the
    greedy argmax by far more than kernel differences between CPUs move a logit (at lr 3e-2 this once won by a
    hair, and an EPYC's fp32 kernels, or MKL_ENABLE_INSTRUCTIONS=AVX2 on a Xeon, generated 'he there friend').
    So it trains at a stable lr and first checks the teacher-forced margin of every target token."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = [{"prompt": "Say hello.", "response": "hello there friend"}] * 40
    run_dir, summary = run_inprocess(tmp_path, *SFT, f"data.train_file={write_jsonl('t.jsonl', rows)}",
                                     "train.lr=1e-2", "train.max_steps=30", "train.eval_every=15", "eval.generate=2",
                                     "eval.max_new_tokens=16", "logging=wandb", "hooks=[save_adapter]")
    evals = [l for l in metrics_lines(run_dir) if "eval/gen_rouge_l" in l]
    assert [l["step"] for l in evals] == [15, 30]
    samples = [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [15, 15, 30, 30]
    last = samples[2:]

    from lorafit.generate import load

    loaded = load(run_dir)
    tok = loaded.tokenizer
    prompt = tok(last[0]["prompt"], add_special_tokens=False)["input_ids"]
    reply = tok("hello there friend" + tok.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1]
    target = logits.gather(1, torch.tensor(reply)[:, None])[:, 0]
    runner_up = logits.scatter(1, torch.tensor(reply)[:, None], float("-inf")).max(1).values
    assert (target - runner_up).min() > 1.0, (target - runner_up).tolist()  # 2.84 on AMX and on AVX2 kernels

    assert [s["output"] for s in last] == ["hello there friend"] * 2 and last[0]["prompt"].endswith("<|assistant|>\n")
    assert summary["eval"]["gen_exact_match"] == 1.0 and summary["eval"]["gen_rouge_l"] == 1.0
    assert evals[-1]["eval/gen_rouge_l"] == generation([s["output"] for s in last], [s["reference"] for s in last])["rouge_l"]
    (table,) = run_dir.glob("wandb/offline-run-*/files/media/table/eval/generations_30_*.table.json")
    assert json.loads(table.read_text())["columns"] == ["prompt", "reference", "output"]


def test_generation_eval_needs_sft_data():
    from lorafit.config import validate

    with pytest.raises(UserError, match="eval.generate=2 scores replies .* it needs data=sft"):
        validate(compose("model=tiny-llama", "eval.generate=2"))


def test_forgetting_is_the_loss_on_general_text_after_minus_before(tmp_path, write_jsonl):
    """eval.forgetting_file: the base's loss (adapter off) and the adapter's, at every evaluation; training hard on
    one reply raises the loss on unrelated text."""
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(["Shares in the bank rose after profits beat forecasts for the third quarter.",
                                    "The striker scored twice in the final and the fans cheered.",
                                    "A new phone chip promises longer battery life and faster apps."] * 4))
    rows = [{"prompt": "Say hello.", "response": "hello there friend"}] * 40
    run_dir, summary = run_inprocess(tmp_path, *SFT, f"data.train_file={write_jsonl('t.jsonl', rows)}",
                                     "train.max_steps=20", "train.eval_every=10", f"eval.forgetting_file={general}")
    evals = [l for l in metrics_lines(run_dir) if "eval/forgetting" in l]
    assert [l["step"] for l in evals] == [10, 20]
    assert evals[0]["eval/forgetting_base_loss"] == evals[1]["eval/forgetting_base_loss"]  # measured once
    e = summary["eval"]
    assert e["forgetting"] == pytest.approx(e["forgetting_loss"] - e["forgetting_base_loss"]) and e["forgetting"] > 0.01

    # the base loss is the untrained model's loss on the same text
    import math

    from lorafit import data
    from lorafit.models import build_model, build_tokenizer
    from lorafit.objectives import loss_sum

    cfg = compose(*SFT, f"eval.forgetting_file={general}", "data.train_file=x.jsonl")
    tok = build_tokenizer(cfg.model)
    ds = data.general_text(cfg, tok)
    assert len(ds) == 12
    batch = data.collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        total, n = loss_sum(build_model(cfg).eval(), batch, "causal_lm")
    assert math.isclose(float(total.sum() / n.sum()), e["forgetting_base_loss"], rel_tol=1e-4)


def test_forgetting_file_errors_name_the_key(tmp_path):
    from lorafit.config import validate

    with pytest.raises(UserError, match="eval.forgetting_file='nope.txt': file not found"):
        validate(compose("model=tiny-llama", "data=files", "eval.forgetting_file=nope.txt", "data.train_file=README.md"))
    with pytest.raises(UserError, match="eval.forgetting_file measures a causal LM's loss"):
        validate(compose("model=tiny-bert", "eval.forgetting_file=bbc_news"))
