"""The peer: what a user writes with HF Trainer + PEFT for the same job (bench/throughput.py runs it).

Same model, data, split, rank, targets, batch, lr, schedule and steps as the lorafit side; the data loading
mirrors lorafit's (the same BBC split and SFT rows) so only the training stack differs.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def main(s: dict, extra: dict) -> dict:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from lorafit.models import resolve  # only to find the packaged weights on disk

    path = resolve(s["model"])
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    seq_cls = s["task"] == "seq_cls"
    if seq_cls:
        from lorafit.data import _bbc_news

        splits = _bbc_news(s["eval_size"])
        enc = lambda ds: ds.map(lambda b: tok(b["text"], truncation=True, max_length=s["max_length"]), batched=True,
                                remove_columns=["text"]).rename_column("label", "labels")
        train, ev = enc(splits.train), enc(splits.eval)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.labels))
        task, collator = TaskType.SEQ_CLS, DataCollatorWithPadding(tok)
    else:
        from datasets import load_dataset

        def encode(row):  # the usual hand-written SFT masking: prompt tokens get -100
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
            prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"][: s["max_length"]]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p_ids) + ids[len(p_ids):])[: len(ids)]}

        raw = load_dataset("json", data_files={"train": s["train_file"], "eval": s["eval_file"]})
        train, ev = (raw[k].map(encode, remove_columns=raw[k].column_names) for k in ("train", "eval"))
        model = AutoModelForCausalLM.from_pretrained(path)
        task, collator = TaskType.CAUSAL_LM, DataCollatorForSeq2Seq(tok, padding=True)
    model = get_peft_model(model, LoraConfig(task_type=task, r=8, lora_alpha=16, lora_dropout=extra["lora_dropout"],
                                             target_modules=s["targets"]))

    class Clock(TrainerCallback):  # time the training steps only, as lorafit's summary does
        tokens = 0

        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.wall = time.perf_counter() - self.t0

    clock = Clock()
    args = TrainingArguments(output_dir="/tmp/peer-out", per_device_train_batch_size=s["batch"], per_device_eval_batch_size=16,
                             learning_rate=s["lr"], max_steps=s["steps"], warmup_steps=int(0.06 * s["steps"]), lr_scheduler_type="linear",
                             logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], seed=42,
                             use_cpu=not torch.cuda.is_available(), dataloader_drop_last=True, bf16=extra.get("bf16", False))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=ev, data_collator=collator, callbacks=[clock])
    n_tokens = 0
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **k):  # non-pad tokens seen, counted the same way as lorafit
        nonlocal n_tokens
        n_tokens += int(inputs["attention_mask"].sum())
        return orig(model, inputs, *a, **k)

    trainer.training_step = counting_step
    trainer.train()
    samples = s["steps"] * s["batch"]
    if seq_cls:
        pred = trainer.predict(ev)
        metrics = {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}
    else:
        loss = trainer.evaluate()["eval_loss"]  # mean over the eval batches' tokens
        metrics = {"loss": loss, "perplexity": float(np.exp(loss))}
    return {"samples_per_s": samples / clock.wall, "tokens_per_s": n_tokens / clock.wall, "eval": metrics}
