"""The training loop, on accelerate: the same code on one CPU, one GPU, DDP, FSDP or DeepSpeed.

Design choices worth knowing:
- Loss is a *sum* over targets divided by the target count of the whole accumulated, all-process batch,
  so gradient accumulation and DDP give the same gradient as one big batch (the bug fixed in
  transformers PR #34191: averaging per micro-batch over-weights short sequences).
- The sample order is a pure function of (seed, epoch); a resumed run skips to its position by step
  count alone, and RNG states come back from the checkpoint, so a resumed CPU run is bitwise identical.
- The scheduler is not passed to accelerator.prepare (which would step it once per process).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorafit import autorank, checkpoint, grpo, metrics, objectives
from lorafit.data import loader
from lorafit.errors import UserError
from lorafit.flops import FlopCounter
from lorafit.objectives import evaluate


@dataclass
class TrainResult:
    steps: int
    eval: dict = field(default_factory=dict)
    train_loss: float = float("nan")
    samples: int = 0  # samples and non-pad tokens seen by this run (not counting a resumed-from part)
    tokens: int = 0
    wall_s: float = 0.0
    eval_s: float = 0.0  # of wall_s; throughput figures leave it out
    rollout_s: float = 0.0  # of wall_s: RL's generation and scoring (objective=grpo)
    skipped_steps: int = 0  # non-finite steps skipped by train.on_nonfinite=skip
    overflow_steps: int = 0  # fp16: steps whose update the GradScaler skipped (routine while it finds its scale)
    best_step: int | None = None  # the step of the best evaluation by the primary metric
    stopped_early: bool = False
    flops: int = 0  # model FLOPs of this run's training steps, all processes (flops.py)
    auto_rank: dict | None = None  # lora.r=auto: the in-run shrink's step and ranks (autorank.shrink)


def build_optimizer(model, cfg):
    t, params = cfg.train, [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        opt_cls = torch.optim.AdamW
    else:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    if cfg.lora.lr_ratio:  # LoRA+: B learns lr_ratio times faster than A
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, opt_cls, lr=t.lr, loraplus_lr_ratio=cfg.lora.lr_ratio,
                                         weight_decay=t.weight_decay)
    return opt_cls(params, lr=t.lr, weight_decay=t.weight_decay)


def train(model, tokenizer, train_ds, eval_ds, cfg, accelerator, run_dir: Path, log, extra_evals=()) -> TrainResult:
    """Each of `extra_evals`, a function (model, step) -> dict, adds its scores to every evaluation (eval.generate,
    eval.forgetting_file)."""
    t, pad_id, nproc = cfg.train, tokenizer.pad_token_id, accelerator.num_processes
    objective = grpo.build(cfg, accelerator, tokenizer, run_dir) if cfg.objective.name == "grpo" else \
        objectives.build(cfg, accelerator)
    mu = objective.iterations  # optimizer steps per batch of prompts (RL reuses a rollout mu times)
    per_epoch = len(train_ds) // (t.batch_size * nproc)  # micro-batches per process per epoch (drop_last)
    if per_epoch == 0:
        raise UserError(f"the train split has {len(train_ds)} rows: too few for one batch of train.batch_size="
                        f"{t.batch_size} x {nproc} processes; lower train.batch_size")
    total = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch / t.grad_accum)) * mu
    if accelerator.distributed_type == "FSDP":  # before the optimizer: it must hold the materialized weights
        from lorafit.models import fsdp_unit_classes, materialize_meta_weights

        materialize_meta_weights(model)
        plugin = accelerator.state.fsdp_plugin
        plugin.transformer_cls_names_to_wrap = fsdp_unit_classes(model, plugin.transformer_cls_names_to_wrap)
    optimizer = build_optimizer(model, cfg)
    from transformers import get_scheduler

    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total), num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler's state goes into trainer_state.json (checkpoint.save's extra), not into a pickle that
    # accelerate would load with weights_only=False.
    checkpoint.keep_only_trainable(accelerator, model)
    if objective.reference and cfg.objective.precompute_ref:  # once, instead of a reference forward per step
        train_ds, eval_ds = (objectives.precompute_reference(model, ds, pad_id, t.eval_batch_size, accelerator, name)
                             for ds, name in ((train_ds, "train"), (eval_ds, "eval")))
    lengths = np.array([len(ids) for ids in eval_ds["input_ids"]])  # eval sorted by length: little padding
    eval_loader = loader(eval_ds, t.eval_batch_size, np.argsort(lengths, kind="stable").tolist(), pad_id, accelerator, False)

    start, metric, fingerprint = 0, metrics.primary_metric(cfg), checkpoint.fingerprint(cfg)
    best, window, rolled = checkpoint.Best(metric, metrics.higher_is_better(metric)), [], None
    shrink_at, shrunk = autorank.shrink_step(cfg, total, accelerator, model), None  # lora.r=auto: the step of the in-run shrink
    if (ckpt := checkpoint.find(t.resume, run_dir)) is not None:
        state = checkpoint.load(accelerator, ckpt, scheduler, fingerprint)
        start, best = state["step"], checkpoint.Best(**state.get("best", best.__dict__))
        shrunk = state.get("auto_rank")  # resumed past the shrink: its choice, for the final cut
        # the per-step losses since the last log: the next logged loss averages them too, as if never stopped
        window = [{k: torch.tensor(v, device=accelerator.device) for k, v in w.items()} for w in state["loss_window"]]
        if start % mu:  # stopped inside a rollout's mu updates: the rest of them train on that rollout
            rolled = grpo.from_safetensors(checkpoint.load_rollout(ckpt, accelerator), accelerator.device)
        accelerator.print(f"resumed from {ckpt} at step {start}/{total}")
    log.truncate_after(start)  # a run that died before its first checkpoint starts over from step 0 too

    def save_checkpoint(step: int) -> None:
        checkpoint.save(accelerator, run_dir, step, t.keep_checkpoints, extra={
            "fingerprint": fingerprint, "scheduler": scheduler.state_dict(), "best": best.__dict__,
            "loss_window": [{k: v.item() for k, v in w.items()} for w in window], "auto_rank": shrunk},
            rollout=grpo.to_safetensors(rolled) if step % mu else None)

    lengths = [len(ids) for ids in train_ds["input_ids"]] if cfg.data.group_by_length else None

    def micro_batches(first: int):
        """An endless stream of micro-batches, starting at micro-batch index `first` of the whole run."""
        epoch, skip = divmod(first, per_epoch)
        while True:
            order = epoch_order(len(train_ds), t.batch_size * nproc, t.seed + epoch, lengths)
            batches = loader(train_ds, t.batch_size, order, pad_id, accelerator, True, cfg.data.packing)
            yield from (accelerator.skip_first_batches(batches, skip) if skip else batches)
            epoch, skip = epoch + 1, 0

    counter = FlopCounter(accelerator.unwrap_model(model))
    # Clip over the model's whole parameter list (frozen ones have no grad): it is what accelerate recognizes to clip
    # FSDP1 by the global norm; a list of the trainable ones alone gets each shard clipped by its own norm.
    stream, params = micro_batches(-(-start // mu) * t.grad_accum), list(model.parameters())  # ceil: rollouts begun
    res, t0, tokens = TrainResult(steps=start, auto_rank=shrunk), time.perf_counter(), torch.zeros((), dtype=torch.long)
    bar = tqdm(total=total, initial=start, desc="train", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    say = bar.write if accelerator.is_local_main_process else (lambda _: None)  # tqdm.write prints even when disabled

    def evaluation(step: int) -> dict:
        t_eval = time.perf_counter()
        out = objective.evaluate(model, eval_loader, step)
        for extra in extra_evals:
            out.update(extra(model, step))
        res.eval_s += time.perf_counter() - t_eval
        log.write(step, {f"eval/{k}": v for k, v in out.items()})
        say(f"step {step}: " + "  ".join(f"eval/{k}={v:.4f}" if isinstance(v, float) else f"eval/{k}={v}" for k, v in out.items()))
        return out

    # SIGTERM / SIGUSR1: a checkpoint, then exit. The bar closes on any exit, so an error prints on a line of its own.
    with checkpoint.Preemption() as preemption, bar:
        if t.eval_on_start and start == 0:
            evaluation(0)
        for step in range(start + 1, total + 1):
            model.train()
            t_step = time.perf_counter()
            if objective.rollout is None:
                batches = [next(stream) for _ in range(t.grad_accum)]
            elif (step - 1) % mu == 0 or rolled is None:  # RL: new prompts, their completions and rewards
                first = (step - 1) // mu * t.grad_accum  # the run's index of the rollout's first micro-batch
                # each micro-batch's index among all processes' (what seeds its sampling: 2 processes sample as 1)
                rolled = [objective.rollout(model, next(stream), (first + j) * nproc + accelerator.process_index)
                          for j in range(t.grad_accum)]
                res.rollout_s += (rollout_s := time.perf_counter() - t_step)
            batches = rolled if objective.rollout is not None else batches
            # the global count of the objective's units (target tokens, pairs, rows) that the step's loss averages over
            n_global = accelerator.reduce(torch.stack([objective.units(b) for b in batches]).sum().to(accelerator.device), "sum")
            step_loss, step_stats = torch.zeros((), device=accelerator.device), {}  # stats: name -> [sum, count]
            for batch in batches:
                # accumulate(): gradients sync (DDP, FSDP) and DeepSpeed's engine steps on the step's last micro-batch only.
                # DDP averages gradients over processes and accelerate / DeepSpeed divide each micro-batch's loss by
                # train.grad_accum: multiplying by both turns those averages into our global sum.
                with accelerator.accumulate(model):
                    losses, stats = objective.loss(model, batch)
                    accelerator.backward(losses.sum() * nproc * t.grad_accum / n_global)
                step_loss += losses.sum().detach()
                for k, v in stats.items():
                    step_stats[k] = step_stats.get(k, 0) + v.to(accelerator.device, torch.float32)
                counter.attention(batch)
                res.samples += len(batch["labels"]) * nproc if objective.rollout else t.batch_size * nproc  # RL: completions
                # Non-pad tokens, as a tensor: no host sync per micro-batch. A packed batch has no padding at all.
                tokens += (batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()) * nproc
            # DeepSpeed clips inside its step (at train.max_grad_norm) and reports the norm as a float
            grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf")))
            finite = bool(torch.isfinite(step_loss) and torch.isfinite(grad_norm))  # one host sync per step
            if not finite and accelerator.scaler is None:  # fp16's GradScaler handles its own overflows (below)
                if t.on_nonfinite == "stop":
                    raise UserError(f"non-finite loss or gradient at step {step} (loss={step_loss.item()}, grad norm="
                                    f"{float(grad_norm)}); lower train.lr, or set train.on_nonfinite=skip. "
                                    f"Checkpoints already written under {run_dir / 'checkpoints'} are kept")
                res.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()  # with fp16's GradScaler: an overflow skips the update and lowers the loss scale
            if accelerator.optimizer_step_was_skipped:
                res.overflow_steps += 1
            else:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if shrink_at and step >= shrink_at and shrunk is None:  # lora.r=auto: every adapter to its exact truncation
                shrunk = res.auto_rank = autorank.shrink_in_run(model, optimizer, accelerator, cfg.lora, step, say)
                # the r_max adapter is not what ships: evaluations from here on compete for best (and early stopping)
                best = checkpoint.Best(metric, metrics.higher_is_better(metric))
            autorank.warm_up(optimizer, scheduler, step, shrunk, cfg.lora)
            window.append(_step_means(accelerator, step_loss, n_global, step_stats))
            if objective.rollout is not None:  # the share of the step spent generating and scoring
                window[-1]["generate_s"] = torch.tensor(rollout_s if (step - 1) % mu == 0 else 0.0)
                window[-1]["step_s"] = torch.tensor(time.perf_counter() - t_step)
            bar.update(1)
            if step % t.log_every == 0 or step == total:
                means = {k: float(torch.stack([w[k] for w in window]).float().mean()) for k in window[-1]}
                res.train_loss = means.pop("loss")
                values = {"train/loss": res.train_loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                          "train/samples": step * t.grad_accum * t.batch_size * nproc, **{f"train/{k}": v for k, v in means.items()}}
                shown = {"loss": f"{res.train_loss:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                         **{k: f"{means[k]:.3f}" for k in ("reward_margin", "reward") if k in means}}
                log.write(step, values)
                bar.set_postfix(shown)
                window = []
            if (t.eval_every and step % t.eval_every == 0) or step == total:
                res.eval = evaluation(step)
                if best.update(step, res.eval) and t.save_best:
                    checkpoint.save_best(accelerator, model, run_dir, step)
            saved = bool(t.save_every and step % t.save_every == 0)
            if saved:
                save_checkpoint(step)
            checkpoint.crash_point("step", step)
            res.steps = step
            if t.early_stopping_patience and best.evals_since >= t.early_stopping_patience:
                say(f"early stop at step {step}: {metric} has not improved on step {best.step}'s "
                          f"{best.value:.4f} for {best.evals_since} evaluations")
                res.stopped_early = True
                break
            if preemption.requested(accelerator):  # every process, at the same step: a collective decision
                if not saved:
                    save_checkpoint(step)
                bar.close()
                if accelerator.is_main_process:
                    got = signal.Signals(preemption.signum).name if preemption.signum else "another process's signal"
                    print(f"lorafit: {got}: stopped after step {step} with a checkpoint in {run_dir / 'checkpoints'}; continue with "
                          f"train.resume=auto (exit code {checkpoint.PREEMPTED_EXIT})", file=sys.stderr, flush=True)
                accelerator.end_training()
                raise SystemExit(checkpoint.PREEMPTED_EXIT)
    if t.save_best and best.step is not None and best.step != res.steps:
        checkpoint.load_best(accelerator, model, run_dir, best.step)  # the hooks see (and save) the best model
        res.eval = best.eval
    res.best_step = best.step
    if not res.eval:  # resumed at the very end: evaluate what was loaded
        res.eval = objective.evaluate(model, eval_loader, res.steps)
    res.wall_s, res.tokens = time.perf_counter() - t0, int(tokens)
    counter.remove()
    res.flops = int(accelerator.reduce(torch.tensor(counter.total, dtype=torch.float64, device=accelerator.device), "sum"))
    return res


def _step_means(accelerator, loss, n_global, stats: dict) -> dict:
    """The step's loss over its global unit count, and each stat's global sum over its global count: one reduction."""
    names = list(stats)
    summed = accelerator.reduce(torch.stack([loss, *(v for k in names for v in stats[k])]), "sum")
    out = {"loss": summed[0] / n_global}
    for i, k in enumerate(names):
        out[k] = summed[1 + 2 * i] / summed[2 + 2 * i].clamp(min=1e-12)  # nothing counted (no tokens): 0
    return out


def epoch_order(n: int, batch: int, seed: int, lengths: list[int] | None = None) -> list[int]:
    """This epoch's sample order: a permutation from (seed, epoch) alone, so a resumed run can recompute it.

    With lengths, rows are grouped by length by HF's own `get_length_grouped_indices` (LengthGroupedSampler's order:
    mega-batches of up to 50 batches sorted by length, the longest batch first). A mega-batch is a whole number of
    batches, so every batch of the (drop_last) loader is one of its groups.
    """
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        return torch.randperm(n, generator=g).tolist()
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, batch, generator=g)


def split_eval(name: str, ds, pad_id: int, cfg, accelerator):
    """A further eval split (Splits.more_eval): a function (model, step) -> its metrics, named NAME_metric."""
    batches = loader(ds, cfg.train.eval_batch_size, list(range(len(ds))), pad_id, accelerator, False)
    return lambda model, step: {f"{name}_{k}": v for k, v in evaluate(model, batches, cfg, accelerator).items()}


def forgetting_eval(ds, pad_id: int, cfg, accelerator):
    """eval.forgetting_file: a function (model, step) -> the LM loss on general text with the adapter, the base
    model's loss (adapter disabled, measured once), and their difference: what fine-tuning cost elsewhere (PEFT's
    method-comparison benchmark reports the same)."""
    batches = loader(ds, cfg.train.eval_batch_size, list(range(len(ds))), pad_id, accelerator, False)
    base: list[float] = []  # measured at the first evaluation, once the model is on its device

    def score(model, step: int) -> dict:
        if not base:
            with accelerator.unwrap_model(model).disable_adapter():
                base.append(evaluate(model, batches, cfg, accelerator)["loss"])
        loss = evaluate(model, batches, cfg, accelerator)["loss"]
        return {"forgetting_loss": loss, "forgetting_base_loss": base[0], "forgetting": loss - base[0]}

    return score


class MetricsLog:
    """metrics.jsonl (main process only) plus the active tracker (W&B / TensorBoard) through accelerate."""

    def __init__(self, path: Path, accelerator):
        self.path, self.accelerator = path, accelerator

    def write(self, step: int, values: dict) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, forget what the crashed run logged past its checkpoint (metrics, and the eval.generate samples
        beside them); the resumed run logs it again."""
        for path in (self.path, self.path.with_name("generations.jsonl")):
            if self.accelerator.is_main_process and path.is_file():
                keep = [line for line, record in _records(path) if record["step"] <= step]
                path.write_text("".join(line + "\n" for line in keep))


def _records(path: Path) -> list[tuple[str, dict]]:
    """The lines of `path` with their JSON records. A torn last line (the process died while writing it) is dropped:
    a line is written before its step's checkpoint, so a torn one is past every checkpoint and the resumed run writes
    it again. Any other line that is not JSON was not written by lorafit."""
    lines, out = [l for l in path.read_text().splitlines() if l], []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} line {i + 1} is not JSON: {line[:60]!r}; repair or move the file, or start over "
                            "with train.overwrite=true") from None
    return out
