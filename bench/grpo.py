"""Benchmark: lorafit's objective=grpo against TRL's GRPOTrainer with PEFT.

    .venv/bin/pip install --no-deps -r bench/requirements-preference.txt   # TRL, for this bench only
    .venv/bin/python bench/grpo.py --check [--model tiny-llama|smollm2-135m]
    .venv/bin/python bench/grpo.py --speed [--steps 20] [--prompts 4] [--repeats 1]

--check (correctness). One model, one LoRA adapter with random A and B copied into both sides, and one fixed group:
two BBC News prompts of the grpo_topic recipe (of equal token length: TRL left-pads prompts and runs its forward
without position ids, so a padded row would sit at other positions than in lorafit's right-padded rows), G
completions that lorafit's rollout sampled, and the recipe's rewards (exact match of the first word, choice match).
TRL gets the very same completions (its generation step is replaced by one returning them) and lorafit's reward
functions (taking the text of its conversational completions), then runs its own `_generate_and_score_completions`
(rewards, group-normalized advantages, the reference's log-probabilities with the adapter off when beta > 0) and
its own `_compute_loss`. For each loss type (grpo, dapo, dr_grpo), with beta 0 and with beta 0.04 plus old-policy
log-probabilities moved by up to +-0.3 nats (so the ratio is not 1 and the clip bites, as in an update of
objective.iterations > 1), the loss, the KL and the clip ratio must agree within 1e-5 relative and the advantages
and rewards within 1e-5 absolute, on the same prompt token ids.

--speed. Completions/s of training, the share of the time spent generating, the reward curve and peak RSS of
`python -m lorafit recipe=grpo_topic` and of a TRL GRPOTrainer + peft LoraConfig script, on SmolLM2-135M-Instruct
with the same prompt file (the recipe's few-shot template filled in; both read it as plain text, as the recipe does), rewards,
G, max new tokens, temperature, loss type (dapo), beta 0, LoRA (r=16, alpha=32, all-linear, peft's default init),
lr, constant schedule, precision (what lorafit's `auto` picks here) and no gradient checkpointing. Both time their
generation (lorafit: summary.json's rollout_wall_s; TRL: its _generate_single_turn, wrapped). Runs alternate A B,
B A over the repeats; ratios are lorafit / TRL, the median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from preference import child, compose, load_adapter, random_adapter, rel, wait_for_quiet  # noqa: E402

TOLERANCE = 1e-5
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
CASES = [(t, beta) for t in LOSS_TYPES for beta in (0.0, 0.04)]  # beta > 0 also moves the old log-probabilities
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
# the recipe's rewards, a format and a length reward: a random adapter's replies rarely name a topic, and all-equal
# rewards would leave every advantage 0 (a check of nothing)
CHECK_REWARDS = ("[{_target_: lorafit.rewards.exact_match, column: label, match: first_word, weight: 1.0}, "
                 "{_target_: lorafit.rewards.choice_match, column: label, choices: [business, entertainment, politics, "
                 "sport, tech], weight: 0.5}, {_target_: lorafit.rewards.regex_format, pattern: ' [A-Z]', full: false, weight: 0.3}, "
                 "{_target_: lorafit.rewards.length_penalty, target: 2, per_token: 4, weight: 0.2}]")
ADAPTER_STD = {"tiny-llama": 0.2, "smollm2-135m": 0.02}


# ---- the prompts ----

def prompt_files(work: Path, n_train: int, n_eval: int) -> dict[str, Path]:
    """train.jsonl / eval.jsonl of {"prompt": the grpo_topic recipe's template filled from a BBC News article,
    "label": its topic}: one file both tools read."""
    from lorafit.data import _bbc_news

    template = compose("recipe=grpo_topic").data.prompt_template
    splits = _bbc_news(max(n_eval, 100))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, ds, n in (("train", splits.train, n_train), ("eval", splits.eval, n_eval)):
        rows = [{"prompt": template.format(text=t), "label": splits.labels[l]}
                for t, l in zip(ds["text"][:n], ds["label"][:n])]
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def overrides(model: str, files: dict, **keys) -> list[str]:
    """lorafit's side: the recipe on the prompt file, with the bench's LoRA and any objective/train keys."""
    return ["recipe=grpo_topic", f"model={model}", "data=prompts", f"data.train_file={files['train']}",
            f"data.eval_file={files['eval']}", "data.prompt_template=null", "data.max_length=1024", f"lora.r={LORA['r']}",
            f"lora.alpha={LORA['alpha']}", f"lora.target_modules={LORA['target_modules']}", "lora.init=default",
            *(f"{k}={v}" for k, v in keys.items())]


def trl_rewards(rewards) -> list:
    """lorafit's reward functions in TRL's form: TRL hands a conversational prompt's completions over as message
    lists, lorafit's functions read their text."""
    def wrap(r):
        def fn(prompts, completions, completion_ids, **columns):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return r.fn(prompts=prompts, completions=texts, completion_ids=completion_ids, **columns)
        fn.__name__ = r.name
        return fn
    return [wrap(r) for r in rewards]


def trl_prompt(cfg, tokenizer, text: str):
    """A prompt as TRL gets it: conversational where lorafit applies the chat template, else the plain text as
    lorafit renders it (TRL tokenizes that with the tokenizer's special tokens, lorafit writes its BOS itself)."""
    from lorafit import data

    if cfg.data.chat_template:
        return [{"role": "user", "content": text}]
    plain = data.prompt_text(tokenizer, [{"role": "user", "content": text}], raw=True)
    adds_bos = tokenizer.bos_token and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return plain[len(tokenizer.bos_token):] if adds_bos and plain.startswith(tokenizer.bos_token) else plain


def grpo_args(o, out_dir: str, per_device: int, **extra):
    """GRPOConfig with lorafit's objective keys."""
    from trl import GRPOConfig

    return GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, per_device_train_batch_size=per_device,
                      num_generations=o.num_generations, max_completion_length=o.max_new_tokens,
                      temperature=o.temperature, top_p=o.top_p, loss_type=o.loss_type, beta=o.beta, epsilon=o.epsilon,
                      epsilon_high=o.epsilon_high if o.epsilon_high is not None else o.epsilon,
                      scale_rewards=o.scale_rewards, mask_truncated_completions=o.mask_truncated,
                      num_iterations=1, reward_weights=[r.weight for r in o.rewards], save_strategy="no",
                      gradient_checkpointing=False, **extra)


# ---- --check ----

def check(model: str = "tiny-llama", generations: int = 4, seed: int = 0, quiet: bool = False, new_tokens: int = 5) -> dict:
    import datasets
    import torch
    from accelerate import Accelerator
    from trl import GRPOTrainer

    from lorafit import adapters, data, grpo, models
    from lorafit import rewards as reward_fns

    work = Path(tempfile.mkdtemp(prefix="lorafit-grpocheck-"))
    files = prompt_files(work / "data", 64, 8)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    # 5 new tokens, not the recipe's 3: enough per group that the shifted ratios clip in every case (with 3, dr_grpo
    # beta=0.04 clipped none; with 8, dapo beta=0's loss was 1.1e-5 relative off TRL's, just over the tolerance)
    base_keys = {"train.mixed_precision": "no", "objective.num_generations": generations, "train.seed": seed,
                 "objective.rewards": CHECK_REWARDS, "objective.max_new_tokens": new_tokens}
    cfg = compose(*overrides(model, files, **base_keys))
    tokenizer = models.build_tokenizer(cfg.model)
    rows = data.tokenize(data.load_splits(cfg), tokenizer, cfg)[0]
    pick = equal_length_pair(rows)
    batch = data.collate([rows[i] for i in pick], tokenizer.pad_token_id)
    torch.manual_seed(seed)
    policy = adapters.attach_lora(models.build_model(cfg), cfg)
    state = random_adapter(policy, seed, ADAPTER_STD.get(model, 0.05))
    policy.train()
    texts = [json.loads(l) for l in files["train"].read_text().splitlines()]
    g = torch.Generator().manual_seed(seed)
    table, tokens_equal = {}, True
    for loss_type, beta in CASES:
        c = compose(*overrides(model, files, **base_keys, **{"objective.loss_type": loss_type, "objective.beta": beta,
                                                            "objective.epsilon_high": 0.28}))
        o = c.objective
        objective = grpo.build(c, accelerator, tokenizer, work / "run")
        rb = objective.rollout(policy, batch, 0)  # the same key and seeds: the same completions in every case
        width = batch["input_ids"].shape[1]  # the prompts' (equal) length
        completions = [ids[width:int(n)] for ids, n in zip(rb["input_ids"].tolist(), rb["attention_mask"].sum(1).tolist())]
        # old log-probabilities away from the current ones: ratios off 1, some clipped (on-policy, ρ = 1 and the
        # surrogate's value is -mean(A), about 0 whatever the code)
        with torch.no_grad():
            now = grpo.token_logps(policy, rb, o.temperature)
        mask = rb["labels"][:, 1:] != -100
        shift = (torch.rand(now.shape, generator=g) * 0.6 - 0.3) * mask
        rb["old_logps"] = now + shift
        with torch.no_grad():
            losses, stats = objective.loss(policy, rb)
        ours = {"loss": float(losses.sum() / objective.units(rb)),
                "clip_ratio": float(stats["clip_ratio"][0] / stats["clip_ratio"][1])}
        if beta:
            ours["kl"] = float(stats["kl"][0] / stats["kl"][1])
        # TRL, on the same completions
        trainer = GRPOTrainer(models.build_model(c), reward_funcs=trl_rewards(reward_fns.build(o.rewards)),
                              args=grpo_args(o, str(work / "trl"), len(completions), bf16=False),
                              train_dataset=datasets.Dataset.from_list([{"prompt": trl_prompt(c, tokenizer, "x")}] * 8),
                              processing_class=tokenizer, peft_config=adapters.peft_config(c))
        load_adapter(trainer.model, state)
        trainer._generate_single_turn = lambda *a, **k: (completions, None)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        inputs = [{"prompt": trl_prompt(c, tokenizer, texts[i]["prompt"]), "label": texts[i]["label"]}
                  for i in pick for _ in range(generations)]
        with torch.no_grad():
            out = trainer._generate_and_score_completions(inputs)
            # TRL's per-token tensors are over completion positions only
            now_trl = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                torch.cat([out["prompt_mask"], out["completion_mask"]], 1), out["completion_ids"].shape[1])[0]
            out["old_per_token_logps"] = now_trl + shift[:, width - 1:]
            trl_loss = trainer._compute_loss(trainer.model, out)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        theirs = {"loss": float(trl_loss), "clip_ratio": metrics["clip_ratio/region_mean"]}
        if beta:
            theirs["kl"] = metrics["kl"]
        prompt_ids = [p for p in batch["input_ids"].tolist() for _ in range(generations)]
        if out["prompt_ids"].tolist() != prompt_ids:
            tokens_equal = False
            print("TRL", out["prompt_ids"][0, :8].tolist(), out["prompt_ids"].shape, "lorafit", prompt_ids[0][:8], len(prompt_ids[0]))
        row = {k: (ours[k], theirs[k], rel(ours[k], theirs[k])) for k in ours}
        m = out["completion_mask"].bool()
        row["logps"] = (0.0, 0.0, float((now[:, width - 1:] - now_trl)[m].abs().max()))
        if beta:
            row["ref_logps"] = (0.0, 0.0, float((rb["ref_logps"][:, width - 1:] - out["ref_per_token_logps"])[m].abs().max()))
        row["advantages"] = (0.0, 0.0, float((rb["advantages"] - out["advantages"]).abs().max()))
        trl_rewards_mean = metrics["reward"]
        ours_reward = float(rb["stat:reward"][0] / rb["stat:reward"][1])
        row["reward"] = (ours_reward, trl_rewards_mean, abs(ours_reward - trl_rewards_mean))
        table[f"{loss_type} beta={beta:g}"] = row
        del trainer
    result = {"model": model, "prompts": len(pick), "generations": generations, "table": table,
              "tokens_equal": tokens_equal, "advantage_spread": float(rb["advantages"].abs().mean()),
              "ok": tokens_equal and all(r <= TOLERANCE for t in table.values() for _, _, r in t.values())}
    if not quiet:
        print_check(result)
    return result


def equal_length_pair(rows) -> list[int]:
    """The first two prompt rows of one token length, and of different labels (two distinct groups)."""
    seen = {}
    for i, r in enumerate(rows):
        other = seen.get(len(r["input_ids"]))
        if other is not None and rows[other]["label"] != r["label"]:
            return [other, i]
        seen.setdefault(len(r["input_ids"]), i)
    raise SystemExit("no two prompts of equal length: raise the number of rows")


def print_check(res: dict) -> None:
    print(f"\nmodel {res['model']}: {res['prompts']} prompts x {res['generations']} completions, random LoRA A and B "
          f"in both; prompt ids identical: {res['tokens_equal']}; mean |advantage| {res['advantage_spread']:.3f}; "
          f"tolerance {TOLERANCE:g}")
    print("\n| loss type, beta | figure | lorafit | TRL | difference |\n|---|---|---|---|---|")
    for case, t in res["table"].items():
        for k, (a, b, r) in t.items():
            kind = "max abs." if k in ("advantages", "logps", "ref_logps") else "abs." if k == "reward" else "rel."
            shown = "" if k in ("advantages", "logps", "ref_logps") else f"{a:.8g} | {b:.8g}"
            print(f"| {case} | {k} | {shown or '- | -'} | {r:.1e} {kind}{'' if r <= TOLERANCE else ' FAIL'} |")
    print(f"\nall within {TOLERANCE:g}: {res['ok']}")


# ---- --speed ----

def lorafit_command(s: dict, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lorafit", *overrides(s["model"], s["files"]), f"train.max_steps={s['steps']}",
            f"train.batch_size={s['prompts']}", "train.grad_accum=1", f"train.lr={s['lr']}", "train.eval_every=0",
            "train.eval_on_start=false", "train.log_every=1", "hooks=[]", f"train.seed={s['seed']}",
            f"train.mixed_precision={s['precision']}", f"hydra.run.dir={run_dir}"]


def trl_train(s: dict) -> dict:
    """The TRL side, in its own process: GRPOTrainer + peft LoraConfig as its docs show, timed over training."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from lorafit import adapters, models
    from lorafit import rewards as reward_fns

    cfg = compose(*overrides(s["model"], s["files"]))
    o = cfg.objective
    rows = [json.loads(l) for l in Path(s["files"]["train"]).read_text().splitlines()]
    tokenizer = models.build_tokenizer(cfg.model)
    ds = datasets.Dataset.from_list([{"prompt": trl_prompt(cfg, tokenizer, r["prompt"]), "label": r["label"]} for r in rows])
    args = grpo_args(o, s["out_dir"], s["prompts"] * o.num_generations, learning_rate=s["lr"], max_steps=s["steps"],
                     lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, seed=s["seed"],
                     bf16=s["precision"] == "bf16", disable_tqdm=True)
    trainer = GRPOTrainer(models.build_model(cfg, quantize=False), reward_funcs=trl_rewards(reward_fns.build(o.rewards)),
                          args=args, train_dataset=ds, processing_class=tokenizer,
                          peft_config=adapters.peft_config(cfg))
    generate_s = [0.0]
    inner = trainer._generate_single_turn

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            generate_s[0] += time.perf_counter() - t0

    trainer._generate_single_turn = timed

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.s = time.perf_counter() - self.t0

    clock = Clock()
    trainer.add_callback(clock)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"train_s": clock.s, "generate_s": generate_s[0], "rewards": rewards,
            "precision": "bf16" if args.bf16 else "fp32"}


def lorafit_result(run_dir: Path) -> dict:
    summ = json.loads((run_dir / "summary.json").read_text())
    rewards = [m["train/reward"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "train/reward" in m]
    return {"train_s": summ["train_wall_s"] - summ["eval_wall_s"], "generate_s": summ["rollout_wall_s"],
            "rewards": rewards, "precision": summ["precision"]}


def run_side(side: str, s: dict, work: Path, i: int, quiet_wait: float) -> dict:
    where = work / f"{side}-{i}"
    where.mkdir(parents=True)
    busy_before = wait_for_quiet(quiet_wait)
    if side == "lorafit":
        rc, rss, others = child(lorafit_command(s, where / "run"), where / "log.txt")
        res = lorafit_result(where / "run") if rc == 0 else None
    else:
        (where / "settings.json").write_text(json.dumps(dict(s, out_dir=str(where / "out"))))
        rc, rss, others = child([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(where / "settings.json"),
                                 str(where / "result.json")], where / "log.txt")
        res = json.loads((where / "result.json").read_text()) if rc == 0 else None
    if res is None:
        raise SystemExit(f"{side} failed ({rc}); see {where / 'log.txt'}")
    completions = s["steps"] * s["prompts"] * s["generations"]
    half = len(res["rewards"]) // 2
    res.update(completions_per_s=completions / res["train_s"], generate_share=res["generate_s"] / res["train_s"],
               reward_first_half=statistics.mean(res["rewards"][:half]), reward_second_half=statistics.mean(res["rewards"][half:]),
               rss_mb=rss, others_cpu=others, busy_before=busy_before)
    print(f"  {side:<7} run {i}: {res['completions_per_s']:.2f} completions/s, generating {res['generate_share']:.0%} "
          f"of {res['train_s']:.0f} s, train reward {res['reward_first_half']:.3f} -> {res['reward_second_half']:.3f} "
          f"(halves), peak RSS {rss:.0f} MiB ({res['precision']}); other processes used {others:.0%} of the CPUs",
          flush=True)
    return res


def speed(steps: int, prompts: int, repeats: int, lr: float, model: str, quiet_wait: float = 600, seed: int = 42) -> dict:
    from lorafit.hardware import resolve_precision

    work = Path(tempfile.mkdtemp(prefix="lorafit-grpospeed-"))
    files = prompt_files(work / "data", steps * prompts, 8)  # one epoch: both sides see the same prompts
    generations = compose("recipe=grpo_topic").objective.num_generations
    s = {"model": model, "steps": steps, "prompts": prompts, "generations": generations, "lr": lr, "seed": seed,
         "precision": resolve_precision("auto"), "files": {k: str(v) for k, v in files.items()}}
    print(f"work dir {work}; {steps} steps x {prompts} prompts x {generations} completions, lr {lr}", flush=True)
    runs = {"lorafit": [], "trl": []}
    for i in range(repeats):  # alternate, so drifts in machine load hit both sides alike
        for side in ("lorafit", "trl") if i % 2 == 0 else ("trl", "lorafit"):
            runs[side].append(run_side(side, s, work, i, quiet_wait))
    ratio = lambda k: statistics.median(a[k] / b[k] for a, b in zip(runs["lorafit"], runs["trl"]))
    res = {"settings": s, "runs": runs, "completions_per_s": ratio("completions_per_s"), "rss": ratio("rss_mb")}
    print(f"\n{model}, {steps} steps x {prompts} prompts x {generations} completions, lr {lr}, LoRA r={LORA['r']} "
          f"alpha={LORA['alpha']} {LORA['target_modules']}, {s['precision']}; {os.cpu_count()} cores")
    print("\n| side | completions/s | generating | train reward, 1st half -> 2nd half | peak RSS MiB |\n|---|---|---|---|---|")
    for side, rs in runs.items():
        for r in rs:
            print(f"| {side} | {r['completions_per_s']:.2f} | {r['generate_share']:.0%} | {r['reward_first_half']:.3f} -> "
                  f"{r['reward_second_half']:.3f} | {r['rss_mb']:.0f} |")
    print(f"\nlorafit / TRL: {res['completions_per_s']:.2f}x completions/s, {res['rss']:.2f}x peak RSS")
    (work / "speed.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="lorafit's losses and advantages against TRL's on one group")
    p.add_argument("--speed", action="store_true", help="completions/s, generate share and reward against TRL")
    p.add_argument("--model", default=None, help="--check: tiny-llama (default) or smollm2-135m; --speed: smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4, help="--speed: prompts per step (each with G completions)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42, help="--speed: both sides' train seed")
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
        out["check"] = check(args.model or "tiny-llama")
        if not out["check"]["ok"]:
            raise SystemExit("lorafit and TRL disagree (see the table)")
    if args.speed:
        out["speed"] = speed(args.steps, args.prompts, args.repeats, args.lr, args.model or "smollm2-135m", args.quiet_wait,
                             args.seed)
    return out


if __name__ == "__main__":
    main()
