"""AdaLoRA (peft's AdaLoraConfig, its budget schedule) on the default job, at lora.r=auto's parameter budget.

    .venv/bin/python bench/adalora.py [--seeds 0 1 2] [--init-r 32] [--lr 1e-3] [--auto auto_project_at0.5_e0.9]
                                      [--out /tmp/rank26]

What a user would otherwise run: HF Trainer + peft AdaLoRA, with `update_and_allocate` called after every optimizer
step (before the gradients are cleared), as peft's docs say. The job is bbc_news as lorafit's recipe runs it:
MiniLM-L6 with its dropout off, query/value, batch 16, lr 1e-3 (--lr), 150 steps, 6% warm-up, linear decay, bf16 autocast,
the same 500 held-out articles, scale 2 (lora_alpha = 2·init_r over AdaLoRA's rank number init_r).

The budget: AdaLoRA's target_r (the mean final rank per module) is the one whose final parameter count is nearest
the lora.r=auto run of the same seed (OUT/sSEED/auto_project, from bench/auto_rank.py). AdaLoRA starts at init_r,
keeps it for tinit = 15 steps, cuts the total rank down on a cubic schedule every deltaT = 5 steps, and holds the
final budget for the last tfinal = 45 steps. Writes OUT/sSEED/adalora/summary.json (read by bench/auto_rank.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

STEPS, BATCH, MAX_LEN, EVAL_SIZE = 150, 16, 128, 500


def run(seed: int, target_r: int, init_r: int, lr: float) -> dict:
    from peft import AdaLoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from lorafit.data import _bbc_news
    from lorafit.models import resolve

    set_seed(seed)
    path = resolve("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    splits = _bbc_news(EVAL_SIZE)
    enc = lambda ds: ds.map(lambda b: tok(b["text"], truncation=True, max_length=MAX_LEN), batched=True,
                            remove_columns=["text"]).rename_column("label", "labels")
    train, ev = enc(splits.train), enc(splits.eval)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.labels), hidden_dropout_prob=0.0,
                                                               attention_probs_dropout_prob=0.0)
    config = AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=init_r, target_r=target_r, lora_alpha=2 * init_r,
                           lora_dropout=0.0, target_modules=["query", "value"], tinit=15, tfinal=45, deltaT=5,
                           total_step=STEPS)
    model = get_peft_model(model, config)

    class Allocate(TrainerCallback):  # AdaLoRA's budget schedule needs this call at every step
        def on_optimizer_step(self, args, state, control, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    args = TrainingArguments(output_dir="/tmp/adalora-out", per_device_train_batch_size=BATCH, per_device_eval_batch_size=100,  # 500 rows: no eval batch dropped
                             learning_rate=lr, max_steps=STEPS, warmup_steps=int(0.06 * STEPS), lr_scheduler_type="linear",
                             logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[], seed=seed,
                             use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      callbacks=[Allocate()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    pred = trainer.predict(ev)
    ranks = {n: int(m.lora_E["default"].count_nonzero()) for n, m in model.named_modules() if hasattr(m, "lora_E")}
    lora_params = sum(r * (m.in_features + m.out_features + 1) for (n, r), m in
                      zip(ranks.items(), (dict(model.named_modules())[n] for n in ranks)))
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    return {"seed": seed, "primary_metric": "accuracy", "eval": {"accuracy": float((np.argmax(pred.predictions, -1) ==
                                                                                   pred.label_ids).mean())},
            "trainable_params": lora_params + head, "lora_params": lora_params, "ranks": ranks, "wall_s": wall,
            "target_r": target_r, "init_r": init_r, "lr": lr}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--init-r", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="lorafit's recipe has 1e-3; AdaLoRA may want another")
    p.add_argument("--auto", default="auto_project_at0.5_e0.9", help="the lora.r=auto run dir whose budget to match")
    p.add_argument("--out", type=Path, default=Path("/tmp/rank26"))
    args = p.parse_args()
    for seed in args.seeds:
        auto = json.loads((args.out / f"s{seed}" / args.auto / "summary.json").read_text())["auto_rank"]
        per_rank = sum(sum(m["shape"]) + 1 for m in auto["modules"])  # AdaLoRA: P, Λ and Q per rank
        target_r = max(1, round(auto["params_after"] / per_rank))
        out = args.out / f"s{seed}" / ("adalora" if args.lr == 1e-3 else f"adalora_lr{args.lr:g}")
        if (out / "summary.json").is_file():
            continue
        s = run(seed, target_r, args.init_r, args.lr)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(s, indent=1))
        print(json.dumps({k: v for k, v in s.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
