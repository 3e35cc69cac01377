"""Benchmark: lorafit's preference objectives against TRL's DPOTrainer / CPOTrainer with PEFT.

    .venv/bin/pip install --no-deps -r bench/requirements-preference.txt   # TRL, for this bench only
    .venv/bin/python bench/preference.py --check [--model tiny-llama|smollm2-135m]
    .venv/bin/python bench/preference.py --speed [--steps 40] [--batch 4] [--repeats 2] [--modes defaults equal]

--check (correctness). One model, one LoRA adapter with random A and B (so the policy differs from the reference),
copied into both sides, and the first batch of pairs of the BBC News set (bench/preference_demo.write_pairs). For
DPO (TRL loss_type="sigmoid"), IPO (loss_type="ipo") and SimPO (CPOTrainer, loss_type="simpo", cpo_alpha=0) it
prints the loss and what TRL logs (rewards/margins, rewards/chosen, rewards/rejected, logps/chosen, logps/rejected:
batch means) from TRL's own `compute_loss` / `get_batch_loss_metrics`, and the same from lorafit's code path:
lorafit.data tokenization through the chat template, lorafit.data.collate, lorafit.objectives.sequence_logps, the
reference with the adapter off (as_reference -> disable_adapter) and the dpo / ipo / simpo functions. Every figure
must agree within 1e-5 relative. Before that it compares the token ids: TRL's DPOTrainer applies the chat template
itself only to conversational rows (message lists); given plain strings it concatenates prompt + reply + EOS with
no template, so the check feeds it conversational rows, and requires their ids to equal lorafit's. CPOTrainer
tokenizes its own way (BOS / EOS added where the template has none at that spot): the script shows where it differs
and runs CPO's loss code on lorafit's token ids.

--speed. Pairs/s of training, held-out reward accuracy (the same 100 pairs) and peak RSS (ru_maxrss of each child
process, from os.wait4) of `python -m lorafit recipe=dpo_jsonl` and of a TRL DPOTrainer + peft LoraConfig script,
on SmolLM2-135M-Instruct with the same pairs (one epoch: steps x batch of them), LoRA r=16 alpha=32 on all-linear,
lr, batch, steps and max length. Two views, as bench/throughput.py:
  defaults  what each tool does with what the user leaves unset: lorafit's recipe (precision `auto`, gaussian LoRA
            init, cosine schedule with 6% warmup) vs DPOConfig's defaults (bf16=True, gradient_checkpointing=True,
            padding_free=False, linear schedule without warmup) and peft's default init
  equal     the same precision (what lorafit's `auto` picks here), schedule, init and no gradient checkpointing
TRL gets conversational rows (so it applies the chat template like lorafit does with the same rows as strings,
token for token: see --check). Runs alternate A B, B A over the repeats; ratios are lorafit / TRL, the median over
the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPOTrainer lives in trl.experimental

TOLERANCE = 1e-5  # relative, on every compared figure
OBJECTIVES = {  # lorafit objective -> (TRL trainer, its loss_type)
    "dpo": ("DPOTrainer", "sigmoid"),
    "ipo": ("DPOTrainer", "ipo"),
    "simpo": ("CPOTrainer", "simpo"),
}
FIGURES = ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
# --check's random adapter: large enough that the summed log-ratios are nats, not hundredths. Otherwise they are the
# difference of two fp32 sums of ~-40 (policy minus reference), whose rounding (~1e-5) is a visible share of them.
ADAPTER_STD = {"tiny-llama": 0.2, "smollm2-135m": 0.05}


# ---- the pairs ----

def conversational(src: Path, dst: Path) -> Path:
    """The same pairs as message lists, the form TRL applies the chat template to (lorafit reads both forms)."""
    rows = [json.loads(l) for l in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                       "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n"
                           for r in rows))
    return dst


def pair_files(work: Path, n_train: int, n_eval: int) -> dict[str, Path]:
    from preference_demo import write_pairs

    train, ev = write_pairs(work, n_train, n_eval)
    return {"train": train, "eval": ev, "train_conv": conversational(train, work / "train_conv.jsonl"),
            "eval_conv": conversational(ev, work / "eval_conv.jsonl")}


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lorafit.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ---- --check ----

def check_cfg(model: str, objective: str, train_file: Path, max_length: int):
    return compose("recipe=dpo_jsonl", f"model={model}", f"objective={objective}", f"data.train_file={train_file}",
                   f"data.eval_file={train_file}", f"data.max_length={max_length}", f"lora.r={LORA['r']}",
                   f"lora.alpha={LORA['alpha']}", f"lora.target_modules={LORA['target_modules']}",
                   "train.mixed_precision=no")


def lorafit_rows(cfg, tokenizer):
    """The train split as lorafit tokenizes it (load_splits -> tokenize: the chat template, labels on the reply)."""
    from lorafit import data

    return data.tokenize(data.load_splits(cfg), tokenizer, cfg)[0]


def random_adapter(model, seed: int, std: float) -> dict:
    """Random A and B (B=0 would make the policy the reference: every margin 0); returns peft's state dict of it."""
    import torch
    from peft import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(peft_model, state: dict) -> None:
    """The check's adapter into a TRL side's model, verified weight for weight."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, state)
    got = get_peft_model_state_dict(peft_model)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), "adapter not copied"


def lorafit_figures(model, batch, cfg, accelerator) -> dict:
    """lorafit's loss and TRL-style logged figures on one collated batch (2B rows: chosen, then rejected)."""
    import torch

    from lorafit import objectives

    o, fn = cfg.objective, objectives.PAIR_LOSSES[cfg.objective.name]
    model.train()  # as in training (LoRA dropout is 0; the reference runs in eval mode inside as_reference)
    with torch.no_grad():
        pol, n = objectives.sequence_logps(model, batch)
        ref = torch.zeros_like(pol) if o.name in objectives.REFERENCE_FREE else objectives.reference_logps(model, batch, accelerator)
        losses, chosen, rejected = objectives._pair_losses(fn, pol, ref, n, o)
    b = len(pol) // 2
    # TRL's CPOTrainer logs the length-averaged log-probabilities for SimPO (the ones its loss uses); DPO the sums
    logps = pol / n if o.name == "simpo" else pol
    return {"loss": losses.mean(), "rewards/margins": (chosen - rejected).mean(), "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(), "logps/chosen": logps[:b].mean(), "logps/rejected": logps[b:].mean()}


def trl_trainer(cfg, tokenizer, dataset, loss_type: str, work: Path):
    """TRL's trainer for this objective on a fresh copy of the base model, with a LoRA config equal to lorafit's."""
    from lorafit import adapters, models

    o = cfg.objective
    common = dict(output_dir=str(work / f"trl-{loss_type}"), report_to=[], use_cpu=True, bf16=False,
                  gradient_checkpointing=False, max_length=cfg.data.max_length, per_device_train_batch_size=4,
                  beta=o.beta, label_smoothing=0.0, save_strategy="no", logging_strategy="no")
    base = models.build_model(cfg)
    if loss_type == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=o.gamma, remove_unused_columns=False, **common)
        return CPOTrainer(base, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=adapters.peft_config(cfg))
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(base, args=DPOConfig(loss_type=[loss_type], **common), train_dataset=dataset,
                      processing_class=tokenizer, peft_config=adapters.peft_config(cfg))


def trl_dpo_figures(trainer, n_pairs: int) -> tuple[dict, dict]:
    """DPOTrainer's loss and logged metrics on its own collated first batch, and that batch."""
    import torch

    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)])
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"loss": loss, **{k: logged[k] for k in FIGURES[1:]}}, inputs


def trl_simpo_figures(trainer, batch) -> dict:
    """CPOTrainer's SimPO loss and logged metrics on lorafit's token ids, put in CPO's batch form."""
    import torch

    b = len(batch["input_ids"]) // 2
    cpo = {}
    for side, rows in (("chosen", slice(0, b)), ("rejected", slice(b, None))):
        cpo[f"{side}_input_ids"] = batch["input_ids"][rows]
        cpo[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        cpo[f"{side}_labels"] = batch["labels"][rows]
    trainer.model.train()
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, cpo)
    return {"loss": loss, **{k: metrics[k] for k in FIGURES[1:]}}


def same_dpo_tokens(trl_batch, batch) -> bool:
    """DPOTrainer's collated batch and lorafit's: the same ids, attention and scored (reply) positions."""
    import torch

    scored = trl_batch["completion_mask"][:, 1:].bool()
    return (trl_batch["input_ids"].shape == batch["input_ids"].shape and torch.equal(trl_batch["input_ids"], batch["input_ids"])
            and torch.equal(trl_batch["attention_mask"], batch["attention_mask"])
            and torch.equal(scored, batch["labels"][:, 1:] != -100))


def split_tokens(rows) -> list[tuple[list[int], list[int]]]:
    """lorafit's rows as (prompt ids, reply ids), chosen then rejected, for comparing with TRL's per-row fields."""
    out = []
    for r in rows:
        for ids, labels in ((r["input_ids"], r["labels"]), (r["rejected_input_ids"], r["rejected_labels"])):
            start = next(i for i, l in enumerate(labels) if l != -100)
            out.append((ids[:start], ids[start:]))
    return out


def token_report(trainer, loss_type: str, tokenizer, lorafit_ds, string_ds) -> dict:
    """How many pairs TRL tokenizes exactly as lorafit does (prompt and both replies), with its conversational rows
    and, for DPOTrainer, with the same pairs as plain strings; and one differing pair, decoded."""
    ours = split_tokens(lorafit_ds)
    trl_rows = trainer.train_dataset
    if loss_type == "simpo":  # CPOTrainer: prompt_input_ids, chosen_input_ids (prompt + reply), chosen_labels
        theirs = []
        for r in trl_rows:
            for side in ("chosen", "rejected"):
                start = next(i for i, l in enumerate(r[f"{side}_labels"]) if l != -100)
                theirs.append((r[f"{side}_input_ids"][:start], r[f"{side}_input_ids"][start:]))
        views = {"conversational": theirs}
    else:  # DPOTrainer: prompt_ids, chosen_ids, rejected_ids
        pick = lambda ds: [(r["prompt_ids"], r[k]) for r in ds for k in ("chosen_ids", "rejected_ids")]
        views = {"conversational": pick(trl_rows),
                 "strings": pick(trainer._prepare_dataset(string_ds, tokenizer, trainer.args, "strings"))}
    report = {}
    for view, theirs in views.items():
        equal = [a == b for a, b in zip(ours, theirs)]
        same_pairs = sum(equal[i] and equal[i + 1] for i in range(0, len(equal), 2))
        first_diff = next((i for i, e in enumerate(equal) if not e), None)
        example = None
        if first_diff is not None:
            (p1, r1), (p2, r2) = ours[first_diff], theirs[first_diff]
            example = {"lorafit": tokenizer.decode(p1[-12:]) + " | " + tokenizer.decode(r1),
                       "trl": tokenizer.decode(p2[-12:]) + " | " + tokenizer.decode(r2),
                       "lorafit_starts": tokenizer.decode(p1[:3]), "trl_starts": tokenizer.decode(p2[:3])}
        report[view] = {"pairs": len(ours) // 2, "identical": same_pairs, "example": example}
    return report


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def check(model: str = "tiny-llama", n_pairs: int = 4, n_rows: int = 32, max_length: int = 256, seed: int = 0,
          std: float | None = None, quiet: bool = False) -> dict:
    """The --check table: {objective: {figure: (lorafit, trl, relative difference)}} and the token reports."""
    import datasets
    import torch
    from accelerate import Accelerator

    from lorafit import adapters, data, models

    work = Path(tempfile.mkdtemp(prefix="lorafit-prefcheck-"))
    files = pair_files(work, n_rows, n_pairs)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    conv_ds = datasets.load_dataset("json", data_files=str(files["train_conv"]), split="train")
    string_ds = datasets.load_dataset("json", data_files=str(files["train"]), split="train")
    table, tokens = {}, {}
    state = None
    for objective, (_, loss_type) in OBJECTIVES.items():
        cfg = check_cfg(model, objective, files["train"], max_length)
        tokenizer = models.build_tokenizer(cfg.model)
        ours_ds = lorafit_rows(cfg, tokenizer)
        conv_rows = lorafit_rows(check_cfg(model, objective, files["train_conv"], max_length), tokenizer)
        same_forms = ours_ds["input_ids"] == conv_rows["input_ids"] and ours_ds["labels"] == conv_rows["labels"]
        assert same_forms, "lorafit tokenizes string rows and message rows differently"
        batch = data.collate([ours_ds[i] for i in range(n_pairs)], tokenizer.pad_token_id)
        torch.manual_seed(seed)
        policy = adapters.attach_lora(models.build_model(cfg), cfg)
        if state is None:  # one adapter for all objectives (the LoRA config is the same)
            state = random_adapter(policy, seed, std or ADAPTER_STD.get(model, 0.05))
        else:
            load_adapter(policy, state)
        ours = lorafit_figures(policy, batch, cfg, accelerator)
        trainer = trl_trainer(cfg, tokenizer, conv_ds, loss_type, work)
        assert len(trainer.train_dataset) == len(ours_ds), "TRL dropped rows (max_length)"
        load_adapter(trainer.model, state)
        tokens[objective] = token_report(trainer, loss_type, tokenizer, ours_ds, string_ds)
        if loss_type == "simpo":
            theirs = trl_simpo_figures(trainer, batch)
        else:
            theirs, trl_batch = trl_dpo_figures(trainer, n_pairs)
            tokens[objective]["batch_identical"] = same_dpo_tokens(trl_batch, batch)
        table[objective] = {k: (float(ours[k]), float(theirs[k]), rel(float(ours[k]), float(theirs[k]))) for k in FIGURES}
        del policy, trainer
    result = {"model": model, "pairs": n_pairs, "table": table, "tokens": tokens,
              "ok": all(r <= TOLERANCE for t in table.values() for _, _, r in t.values())
                    and all(t.get("batch_identical", True) for t in tokens.values())}
    if not quiet:
        print_check(result)
    return result


def print_check(res: dict) -> None:
    print(f"\nmodel {res['model']}, first batch of {res['pairs']} pairs, random LoRA A and B copied into both sides; "
          f"tolerance {TOLERANCE:g} relative")
    for objective, t in res["tokens"].items():
        for view, r in ((v, r) for v, r in t.items() if v != "batch_identical"):
            print(f"  tokens {objective:<6} {OBJECTIVES[objective][0]} {view:<15}: {r['identical']}/{r['pairs']} pairs "
                  f"identical to lorafit's" + (f"; e.g. lorafit {r['example']['lorafit']!r} vs TRL {r['example']['trl']!r}"
                                                f" (starts {r['example']['lorafit_starts']!r} vs {r['example']['trl_starts']!r})"
                                                if r["example"] else ""))
        if "batch_identical" in t:
            print(f"  tokens {objective:<6} collated first batch (ids, attention, scored positions) identical: {t['batch_identical']}")
    print(f"\n| objective (TRL) | figure | lorafit | TRL | rel. diff |\n|---|---|---|---|---|")
    for objective, t in res["table"].items():
        trainer, loss_type = OBJECTIVES[objective]
        for k, (a, b, r) in t.items():
            print(f"| {objective} ({trainer} {loss_type}) | {k} | {a:.8g} | {b:.8g} | {r:.1e}{'' if r <= TOLERANCE else ' FAIL'} |")
    print(f"\nall within {TOLERANCE:g}: {res['ok']}")


# ---- --speed ----

def lorafit_command(s: dict, mode: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "lorafit", "recipe=dpo_jsonl", f"model={s['model']}", f"data.train_file={s['train']}",
           f"data.eval_file={s['eval']}", f"train.max_steps={s['steps']}", f"train.batch_size={s['batch']}",
           "train.grad_accum=1", f"data.max_length={s['max_length']}", f"train.lr={s['lr']}", f"lora.r={LORA['r']}",
           f"lora.alpha={LORA['alpha']}", f"lora.target_modules={LORA['target_modules']}", "train.eval_every=0",
           f"train.eval_batch_size={s['eval_batch']}", "hooks=[]", f"train.seed={s['seed']}",
           f"hydra.run.dir={run_dir}"]
    if mode == "equal":  # peft's default init as TRL's side has; the schedule below is lorafit's recipe's on both
        cmd += ["lora.init=default", f"train.mixed_precision={s['precision']}"]
    return cmd


def trl_settings(s: dict, mode: str, out_dir: Path) -> dict:
    t = dict(s, out_dir=str(out_dir))
    if mode == "equal":
        # lorafit's recipe schedule: cosine, int(0.06 * steps) warmup steps (a float here would be HF's ceil of it)
        t.update(bf16=s["precision"] == "bf16", gradient_checkpointing=False, scheduler="cosine",
                 warmup_steps=int(0.06 * s["steps"]))
    return t


def trl_train(settings: dict) -> dict:
    """The TRL side, in its own process: DPOTrainer + peft LoraConfig as its docs show, timed over training only."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorafit.models import resolve

    s, path = settings, resolve(settings["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    load = lambda f: datasets.load_dataset("json", data_files=f, split="train")
    train, ev = load(s["train_conv"]), load(s["eval_conv"])
    kwargs = dict(output_dir=s["out_dir"], per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1,
                  learning_rate=s["lr"], max_steps=s["steps"], max_length=s["max_length"], seed=s["seed"],
                  per_device_eval_batch_size=s["eval_batch"], save_strategy="no", eval_strategy="no", report_to=[],
                  use_cpu=True, disable_tqdm=True)
    for key, arg in (("bf16", "bf16"), ("gradient_checkpointing", "gradient_checkpointing"),
                     ("scheduler", "lr_scheduler_type"), ("warmup_steps", "warmup_steps")):
        if key in s:  # "equal": set; "defaults": DPOConfig's own
            kwargs[arg] = s[key]
    args = DPOConfig(**kwargs)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                             task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.s = time.perf_counter() - self.t0

    clock = Clock()
    trainer = DPOTrainer(model, args=args, train_dataset=train, eval_dataset=ev, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    out = trainer.train()
    metrics = trainer.evaluate()
    return {"samples_per_s": s["steps"] * s["batch"] / clock.s, "train_s": clock.s,
            "hf_samples_per_s": out.metrics["train_samples_per_second"], "precision": "bf16" if args.bf16 else "fp32",
            "gradient_checkpointing": args.gradient_checkpointing, "scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)),
            "reward_accuracy": metrics["eval_rewards/accuracies"], "reward_margin": metrics["eval_rewards/margins"],
            "eval_loss": metrics["eval_loss"], "eval_pairs": len(ev)}


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # idle and iowait are not busy


def wait_for_quiet(limit_s: float, busy: float = 0.15) -> float:
    """Wait (up to limit_s) until other processes use under `busy` of the machine's CPUs over 3 s: on a shared
    2-core machine, a run beside another job measures the other job. Returns the share last seen."""
    t0 = time.time()
    while True:
        a = cpu_ticks()
        time.sleep(3)
        b = cpu_ticks()
        share = (b[0] - a[0]) / max(b[1] - a[1], 1)
        if share < busy or time.time() - t0 > limit_s:
            return share
        time.sleep(10)


def child(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run one side as its own process: (exit code, its peak RSS in MiB from its rusage, the share of the machine's
    CPU time that *other* processes used meanwhile: the run's contention)."""
    hz = os.sysconf("SC_CLK_TCK")
    before, t0 = cpu_ticks(), time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
    after = cpu_ticks()
    others = (after[0] - before[0]) / hz - (usage.ru_utime + usage.ru_stime)
    return (os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024,  # KiB on Linux
            max(others, 0.0) / ((time.time() - t0) * os.cpu_count()))


def run_side(side: str, s: dict, mode: str, work: Path, i: int, quiet_wait: float) -> dict:
    where = work / f"{mode}-{side}-{i}"
    where.mkdir(parents=True)
    busy_before = wait_for_quiet(quiet_wait)
    if side == "lorafit":
        rc, rss, others = child(lorafit_command(s, mode, where / "run"), where / "log.txt")
        if rc:
            raise SystemExit(f"lorafit failed ({rc}); see {where / 'log.txt'}")
        summ = json.loads((where / "run" / "summary.json").read_text())
        res = {"samples_per_s": summ["samples_per_s"], "train_s": summ["train_wall_s"] - summ["eval_wall_s"],
               "precision": summ["precision"], "reward_accuracy": summ["eval"]["reward_accuracy"],
               "reward_margin": summ["eval"]["reward_margin"], "eval_loss": summ["eval"]["loss"], "eval_pairs": summ["eval"]["n"]}
    else:
        (where / "settings.json").write_text(json.dumps(trl_settings(s, mode, where / "out")))
        rc, rss, others = child([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(where / "settings.json"),
                         str(where / "result.json")], where / "log.txt")
        if rc:
            raise SystemExit(f"TRL failed ({rc}); see {where / 'log.txt'}")
        res = json.loads((where / "result.json").read_text())
    res.update(rss_mb=rss, others_cpu=others, busy_before=busy_before)
    print(f"  {mode:<8} {side:<7} run {i}: {res['samples_per_s']:.3f} pairs/s, reward accuracy "
          f"{res['reward_accuracy']:.3f}, peak RSS {rss:.0f} MiB ({res['precision']}); other processes used "
          f"{others:.0%} of the CPUs meanwhile", flush=True)
    return res


def speed(modes, steps: int, batch: int, repeats: int, max_length: int, lr: float, model: str, n_eval: int,
          quiet_wait: float = 600) -> list[dict]:
    from lorafit.hardware import resolve_precision

    work = Path(tempfile.mkdtemp(prefix="lorafit-prefspeed-"))
    files = pair_files(work / "data", steps * batch, n_eval)  # one epoch: both sides see the same pairs
    s = {"model": model, "steps": steps, "batch": batch, "max_length": max_length, "lr": lr, "seed": 42,
         "eval_batch": 10 if n_eval % 10 == 0 else 1,  # TRL averages per-batch accuracies: equal batches keep it exact
         "precision": resolve_precision("auto"), **{k: str(v) for k, v in files.items()}}
    print(f"work dir {work}; {steps} steps x {batch} pairs, max length {max_length}, lr {lr}, {n_eval} eval pairs", flush=True)
    rows = []
    for mode in modes:
        runs = {"lorafit": [], "trl": []}
        for i in range(repeats):  # alternate, so drifts in machine load hit both sides alike
            for side in ("lorafit", "trl") if i % 2 == 0 else ("trl", "lorafit"):
                runs[side].append(run_side(side, s, mode, work, i, quiet_wait))
        ratio = lambda k: statistics.median(a[k] / b[k] for a, b in zip(runs["lorafit"], runs["trl"]))
        rows.append({"mode": mode, "samples_per_s": ratio("samples_per_s"), "rss": ratio("rss_mb"), "runs": runs})
    print_speed(rows, s)
    (work / "speed.json").write_text(json.dumps({"settings": s, "rows": rows}, indent=1))
    return rows


def print_speed(rows: list[dict], s: dict) -> None:
    print(f"\n{s['model']}, {s['steps']} steps x {s['batch']} pairs, max length {s['max_length']}, lr {s['lr']}, "
          f"LoRA r={LORA['r']} alpha={LORA['alpha']} {LORA['target_modules']}; {os.cpu_count()} cores")
    print("\n| view | pairs/s lorafit / TRL | peak RSS lorafit / TRL | pairs/s lorafit | pairs/s TRL | "
          "reward acc. lorafit | reward acc. TRL | peak RSS MiB lorafit | peak RSS MiB TRL |\n|---|---|---|---|---|---|---|---|---|")
    fmt = lambda runs, k, f: " ".join(format(r[k], f) for r in runs)
    for r in rows:
        l, t = r["runs"]["lorafit"], r["runs"]["trl"]
        print(f"| {r['mode']} | {r['samples_per_s']:.2f}x | {r['rss']:.2f}x | {fmt(l, 'samples_per_s', '.3f')} | "
              f"{fmt(t, 'samples_per_s', '.3f')} | {fmt(l, 'reward_accuracy', '.2f')} | {fmt(t, 'reward_accuracy', '.2f')} | "
              f"{fmt(l, 'rss_mb', '.0f')} | {fmt(t, 'rss_mb', '.0f')} |")
    for r in rows:
        t = r["runs"]["trl"][0]
        others = lambda side: " ".join(f"{x['others_cpu']:.0%}" for x in r["runs"][side])
        print(f"  {r['mode']}: other processes' share of the CPUs during the runs: lorafit {others('lorafit')}, TRL "
              f"{others('trl')}")
        print(f"  {r['mode']}: lorafit {r['runs']['lorafit'][0]['precision']}; TRL {t['precision']}, gradient checkpointing "
              f"{t['gradient_checkpointing']}, {t['scheduler']} schedule; HF's own train_samples_per_second "
              + " ".join(f"{x['hf_samples_per_s']:.3f}" for x in r["runs"]["trl"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="lorafit's losses and rewards against TRL's on one batch")
    p.add_argument("--speed", action="store_true", help="pairs/s, reward accuracy and peak RSS against TRL")
    p.add_argument("--model", default=None, help="--check: tiny-llama (default) or smollm2-135m; --speed: smollm2-135m")
    p.add_argument("--pairs", type=int, default=4, help="--check: pairs in the batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-pairs", type=int, default=100)
    p.add_argument("--modes", nargs="+", default=["defaults", "equal"], choices=["defaults", "equal"])
    p.add_argument("--quiet-wait", type=float, default=600, help="--speed: seconds to wait at most, before each run, "
                   "for other processes to leave the CPUs (under 15%% busy)")
    p.add_argument("--trl-child", nargs=2, metavar=("SETTINGS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_child:
        settings, out = args.trl_child
        Path(out).write_text(json.dumps(trl_train(json.loads(Path(settings).read_text()))))
        return None
    if not (args.check or args.speed):
        p.error("give --check and/or --speed")
    out = {}
    if args.check:
        out["check"] = check(args.model or "tiny-llama", args.pairs, max_length=args.max_length)
        if not out["check"]["ok"]:
            raise SystemExit("lorafit and TRL disagree (see the table)")
    if args.speed:
        out["speed"] = speed(args.modes, args.steps, args.batch, args.repeats, args.max_length, args.lr,
                             args.model or "smollm2-135m", args.eval_pairs, args.quiet_wait)
    return out


if __name__ == "__main__":
    main()
