"""Training end to end on tiny models: loss falls, adapters reload with plain peft, merges are exact, runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLS, TINY_LM, compose, metrics_lines, run_inprocess
from safetensors.torch import load_file

from lorafit.models import resolve


def train_losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in metrics_lines(run_dir) if "train/loss" in m]


def assert_loss_falls(run_dir: Path, factor: float = 0.8):
    losses = train_losses(run_dir)
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert tail < factor * head, f"loss did not fall: {losses}"


def test_seq_cls_trains_and_writes_the_run_dir(tmp_path):
    run_dir, summary = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=40", "hooks=[save_adapter,spectrum,merge]")
    assert_loss_falls(run_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "analysis/spectrum.json", "merged/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert summary["steps"] == 40 and summary["eval"]["accuracy"] > 0.8  # 3 balanced classes: chance is 1/3
    assert summary["trainable_params"] < summary["total_params"] and summary["samples_per_s"] > 0
    # The merge: exact against the unmerged float model, and against the model that was trained in memory.
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-5
    assert summary["merge"]["max_abs_diff_merged_vs_trained"] < 1e-5


def test_adapter_reloads_with_plain_peft_head_included(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, summary = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=15", "hooks=[save_adapter,merge]")
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    batch = tok(["the market shares of the bank", "a match goal for the striker"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=3)
    fresh_head = base.classifier.weight.detach().clone()
    reloaded = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged").eval()
    with torch.no_grad():
        a, b = reloaded(**batch).logits, merged(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # The trained head came back from the adapter, not a freshly initialized one.
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    head_key = next(k for k in saved if "classifier" in k and k.endswith("weight"))
    assert not torch.allclose(saved[head_key], fresh_head)
    assert merged.config.id2label[0] == "business"  # label names (sorted) travel with the model


def test_causal_lm_loss_falls_and_reports_perplexity(tmp_path):
    run_dir, summary = run_inprocess(tmp_path, *TINY_LM, "train.max_steps=40", "hooks=[save_adapter,merge]")
    assert_loss_falls(run_dir, factor=0.9)
    assert summary["primary_metric"] == "perplexity" and summary["eval"]["perplexity"] > 1
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_tiny_llama_trains(tmp_path, quant):
    run_dir, summary = run_inprocess(tmp_path, *TINY_LM, f"quant={quant}", "train.max_steps=25", "quant.compute_dtype=float32",
                                     "train.eval_every=10", "hooks=[save_adapter,merge]")
    assert_loss_falls(run_dir, factor=0.9)
    # The merge goes into the *dequantized* base: exact against the adapter on that base, and for nf4 it computes
    # what the 4-bit model computed (the hook refuses to save otherwise). LLM.int8 quantizes activations at
    # inference, so for int8 the difference is recorded but not held to a tolerance.
    m = summary["merge"]
    # fp32 rounding on this tiny model trained at a high lr reaches ~2e-4 of the logit scale (exact in float64).
    assert m["max_abs_diff_merged_vs_unmerged"] < 1e-3 * m["logit_scale"]
    if quant == "nf4":
        assert m["max_abs_diff_merged_vs_trained"] < 1e-3 * m["logit_scale"] and "float32 matmul" in m["base_compute"]
        assert m["tolerance_vs_trained"] == pytest.approx(1e-3 * m["logit_scale"])
    else:
        assert "tolerance_vs_trained" not in m and "int8 activations" in m["base_compute"]
    assert (run_dir / "adapter" / "lorafit.json").is_file()


def test_4bit_model_computes_the_dequantized_function_on_every_cpu(monkeypatch):
    """bitsandbytes 0.50 on AVX512-BF16 CPUs runs eval-mode 4-bit layers through a fused bf16 kernel on repacked
    weights, and keeps them repacked for training, where that kernel has no gradient. Pretending every CPU has
    the flag, lorafit's 4-bit model must still compute x @ dequantize(W).T in eval and train alike."""
    import bitsandbytes.nn.modules

    from lorafit.adapters import attach_lora
    from lorafit.merge import logits, merge_base
    from lorafit.models import build_model

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    cfg = compose(*TINY_LM, "quant=nf4", "quant.compute_dtype=float32")
    probe = {"input_ids": torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))}

    def lora_grads(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = attach_lora(build_model(cfg), compose(*TINY_LM, "quant=nf4", "lora.init=default"))
        for n, p in model.named_parameters():  # B = 0 at init would hide the gradient path through A
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        if evaluate_first:
            logits(model, probe)
        model.train()
        model(**probe, labels=probe["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    quantized = build_model(cfg)
    assert all(not m.support_avx512bf16_for_cpu for m in quantized.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    a, b = logits(quantized, probe), logits(merge_base(cfg, None, "fp32"), probe)
    assert (a - b).abs().max() < 1e-5 * b.abs().max(), (a - b).abs().max()
    plain, after_eval = lora_grads(False), lora_grads(True)
    assert plain.keys() == after_eval.keys() and len(plain) > 0
    for k in plain:
        assert torch.allclose(plain[k], after_eval[k], atol=1e-6, rtol=1e-5), (k, (plain[k] - after_eval[k]).abs().max())


def test_sft_on_prompt_response_and_messages(tmp_path, write_jsonl):
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": f"Name topic {i}"}, {"role": "assistant", "content": "sport"}]}
             for i in range(40)]
    train, ev = write_jsonl("train.jsonl", rows), write_jsonl("eval.jsonl", rows[:8] + rows[-8:])
    run_dir, summary = run_inprocess(tmp_path, *TINY_LM, "data=sft", f"data.train_file={train}", f"data.eval_file={ev}",
                                     "train.max_steps=40", "hooks=[save_adapter]")
    assert_loss_falls(run_dir, factor=0.7)


def test_files_with_sentence_pairs_and_string_labels(tmp_path):
    import csv

    for name, n in (("train.csv", 96), ("dev.csv", 24)):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["premise", "hypothesis", "gold"])
            for i in range(n):
                same = i % 2 == 0
                w.writerow([f"the cat sat on mat {i}", f"the cat sat on mat {i}" if same else f"stocks fell {i} points",
                            "entailment" if same else "contradiction"])
    run_dir, summary = run_inprocess(tmp_path, *TINY_CLS, "data=files", f"data.train_file={tmp_path / 'train.csv'}",
                                     f"data.eval_file={tmp_path / 'dev.csv'}", "data.text_columns=[premise,hypothesis]",
                                     "data.label_column=gold", "train.max_steps=30", "hooks=[save_adapter]")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert summary["eval"]["accuracy"] >= 0.9  # identical vs unrelated pairs is easy


def test_resume_after_losing_later_checkpoints_is_bitwise_identical(tmp_path):
    common = [*TINY_CLS, "train.max_steps=12", "train.save_every=4", "train.keep_checkpoints=5", "lora.dropout=0.1",
              "hooks=[save_adapter]"]
    full_dir, _ = run_inprocess(tmp_path / "full", *common)
    crash_dir, _ = run_inprocess(tmp_path / "crash", *common)
    assert sorted(p.name for p in (crash_dir / "checkpoints").iterdir()) == ["step_12", "step_4", "step_8"]
    # Pretend the run died just after step 4's checkpoint: what came later is gone.
    import shutil

    for late in ("checkpoints/step_8", "checkpoints/step_12", "adapter", "summary.json"):
        shutil.rmtree(crash_dir / late, ignore_errors=True) if (crash_dir / late).is_dir() else (crash_dir / late).unlink()
    from lorafit.run import run

    run(compose(*common, "train.resume=auto"), run_dir=crash_dir)
    a = load_file(full_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(crash_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_lines(full_dir) == metrics_lines(crash_dir)
    # A checkpoint holds the trainable weights only: far smaller than the base model.
    ckpt_bytes = sum(f.stat().st_size for f in (crash_dir / "checkpoints" / "step_12").rglob("*model*.safetensors"))
    base_bytes = Path(resolve("tiny-bert"), "model.safetensors").stat().st_size
    assert ckpt_bytes < base_bytes / 4


def test_wandb_offline_writes_a_run_and_keeps_secrets_out(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=3", "logging=wandb", "logging.group=test-group",
                               "hooks=[save_adapter]")
    records = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and records[0].stat().st_size > 0
    blob = records[0].read_bytes()
    assert b"2\x0atest-group" in blob  # the run record's group field (protobuf tag 0x32, length 10)
    assert b'{"name":"tiny-bert","task":"seq_cls"' in blob  # the config record (not just the command line)
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert b"fake-key-0123456789abcdef" not in f.read_bytes(), f


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = (*TINY_CLS, "train.max_steps=4", "train.save_every=2", "logging=wandb", "hooks=[]")
    run_dir, _ = run_inprocess(tmp_path, *args)
    run_inprocess(tmp_path, *args, "train.resume=auto")  # the same run dir, from its last checkpoint
    other, _ = run_inprocess(tmp_path / "other", *args)  # a new run: a new W&B run
    runs = lambda d: [p.name for p in (d / "wandb").glob("offline-run-*")]  # offline-run-<time>-<id>[-<n>]
    run_id = (run_dir / "wandb_run_id").read_text()
    assert len(runs(run_dir)) == 2 and all(f"-{run_id}" in name for name in runs(run_dir))
    assert len(runs(other)) == 1 and run_id not in runs(other)[0]


def test_tensorboard_writes_events(tmp_path):
    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=3", "logging=tensorboard", "hooks=[]")
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_grad_accumulation_equals_one_big_batch_on_variable_length_rows(tmp_path, write_jsonl):
    """Loss is normalized over the tokens of the whole accumulated batch (transformers PR #34191): 4 micro-batches
    of 2 give the gradient of one batch of 8, though their token counts differ a lot."""
    rows = [{"prompt": f"q{i}", "response": " ".join(["word"] * (1 + (i * 7) % 40))} for i in range(64)]
    train, ev = write_jsonl("t.jsonl", rows), write_jsonl("e.jsonl", rows[:8])
    common = [*TINY_LM, "data=sft", f"data.train_file={train}", f"data.eval_file={ev}", "train.max_steps=4",
              "lora.dropout=0.0", "model.dropout=0.0", "hooks=[save_adapter]",
              "train.lr=3e-3"]  # a realistic step: the float summation-order noise scales with it
    big, _ = run_inprocess(tmp_path / "big", *common, "train.batch_size=8", "train.grad_accum=1")
    acc, _ = run_inprocess(tmp_path / "acc", *common, "train.batch_size=2", "train.grad_accum=4")
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (big, acc))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    la, lb = train_losses(big), train_losses(acc)
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_saved_as_plain_lora_on_the_original_base(tmp_path, init):
    """PiSSA/OLoRA train A, B on a residual W − s·B0·A0. The saved adapter is converted (rank 2r: s·B·A − s·B0·A0)
    so any LoRA consumer on the original base gets the trained function, and the spectrum is that real update."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, summary = run_inprocess(tmp_path, *TINY_CLS, f"lora.init={init}", "lora.r=4", "train.max_steps=10",
                                     "hooks=[save_adapter,spectrum,merge]")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # peft loads it without re-decomposing W
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in saved.items() if "lora_A" in k} == {8}
    m = summary["merge"]
    assert m["max_abs_diff_merged_vs_trained"] < 1e-4 * m["logit_scale"]  # the converted adapter is the trained model
    # Plain peft on the untouched base: the same function as the merged model.
    original = lambda: AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=3)
    reloaded = PeftModel.from_pretrained(original(), run_dir / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged").eval()
    x = torch.randint(5, 500, (2, 10))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-5)
    # The spectrum is that of merged W − original W, not of the s·B·A the model held in memory.
    doc = json.loads((run_dir / "analysis" / "spectrum.json").read_text())
    entry = doc["modules"][0]
    name = entry["name"].split("bert.", 1)[-1]
    delta = (merged.bert.get_submodule(name).weight - original().bert.get_submodule(name).weight).detach()
    want = torch.linalg.svdvals(delta.double())[: len(entry["singular_values"])]
    got = torch.tensor(entry["singular_values"], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5 * float(want[0])), (got, want)


BEST = [*TINY_CLS, "train.max_steps=30", "train.eval_every=3", "train.save_every=3", "train.keep_checkpoints=20",
        "train.save_best=true", "hooks=[save_adapter]"]


def _evals(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["eval/accuracy"]) for m in metrics_lines(run_dir) if "eval/accuracy" in m]


def test_save_best_keeps_the_best_evaluation_and_resumes_exactly(tmp_path):
    from conftest import run_cli

    full = tmp_path / "full"
    assert run_cli(*BEST, f"hydra.run.dir={full}").returncode == 0
    evals, summary = _evals(full), json.loads((full / "summary.json").read_text())
    best_step, best_acc = max(evals, key=lambda e: (e[1], -e[0]))  # the first step with the highest accuracy
    assert summary["best_step"] == summary["adapter_step"] == best_step < 30  # this run's last step is not its best
    assert summary["eval"]["accuracy"] == best_acc
    adapter = load_file(full / "adapter" / "adapter_model.safetensors")
    at_best = load_file(full / "checkpoints" / f"step_{best_step}" / "model.safetensors")
    assert adapter and all(torch.equal(v, at_best[k.replace(".weight", ".default.weight")]) for k, v in adapter.items()
                           if ".lora_" in k)
    # Killed after the best step's checkpoint, then resumed: the same best, the same adapter.
    crashed = tmp_path / "crash"
    assert run_cli(*BEST, f"hydra.run.dir={crashed}", env={"LORAFIT_FAULT": f"step:{best_step + 2}"}).returncode != 0
    assert run_cli(*BEST, "train.resume=auto", f"hydra.run.dir={crashed}").returncode == 0
    assert json.loads((crashed / "summary.json").read_text())["best_step"] == best_step
    again = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path):
    full, _ = run_inprocess(tmp_path / "full", *BEST)
    best, since, expected = -1.0, 0, None
    for step, acc in _evals(full):  # the stop the rule implies, read off the full run's evaluations
        best, since = (acc, 0) if acc > best else (best, since + 1)
        if since == 2 and expected is None:
            expected = step
    assert expected is not None and expected < 30
    run_dir, summary = run_inprocess(tmp_path / "stop", *BEST, "train.early_stopping_patience=2")
    assert summary["stopped_early"] and summary["steps"] == expected
    assert max(m["step"] for m in metrics_lines(run_dir)) == expected


def test_causal_lm_evaluation_scores_in_bounded_chunks_with_the_same_result(monkeypatch):
    """Evaluation scores a causal LM's batch in groups of whole rows with at most EVAL_TARGETS targets per forward
    (float logits are targets × vocab), and the loss is the unchunked one."""
    from accelerate import Accelerator

    from lorafit import objectives as train_mod
    from lorafit.data import collate
    from lorafit.models import build_model

    cfg = compose(*TINY_LM)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (9, 17, 5, 30, 12):
        ids = torch.randint(5, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * 2 + ids[2:]})
    batch = collate(rows, pad_id=0)
    seen = []  # positions each forward sends through the LM head: its targets
    model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[:-1].numel()))
    acc = Accelerator(cpu=True)
    results = {}
    for budget in (10_000, 20):
        monkeypatch.setattr(train_mod, "EVAL_TARGETS", budget)
        seen.clear()
        results[budget] = train_mod.evaluate(model, [batch], cfg, acc)
        calls = list(seen)
    assert len(calls) == 4 and sum(calls) == sum(len(r["input_ids"]) - 2 for r in rows)
    assert all(c <= 20 or c == 28 for c in calls)  # the 30-token row alone has 28 targets: one row at least
    assert results[20]["n"] == results[10_000]["n"] == 5
    assert results[20]["loss"] == pytest.approx(results[10_000]["loss"], rel=1e-6)
