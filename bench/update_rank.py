"""How low-rank is an RL or preference update? The spectrum of ΔW after GRPO or DPO against SFT on the same task.

    .venv/bin/python bench/update_rank.py --objective grpo [--r 1 4 32] [--steps 40] [--out DIR] [OVERRIDE ...]
    .venv/bin/python bench/update_rank.py --objective dpo [--r 16] [--steps 60] [--lr 1e-4]

"LoRA Without Regret" (Thinking Machines, 2025) found that RL with LoRA matches full fine-tuning even at rank 1.
This measures it with lorafit's spectrum hook on SmolLM2-135M and BBC News topics, at each rank r (LoRA on all
linear layers, alpha 2r):
- grpo: recipe=grpo_topic (the reward: the held-out topic named in one word) against SFT on the same prompts with
  the real topic as the reply; both scored by the greedy reply's first word on the same 64 held-out articles;
- dpo: the topic pairs of bench/preference_demo.py, DPO against SFT on (prompt, chosen); held-out reward accuracy
  and perplexity.
For each run: the mean effective rank (exp of the entropy of the normalized singular values) and r90 (directions
holding 90% of ΔW's energy) over every adapted module, the share of the energy in the top direction, and the
held-out result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference_demo import REPO, write_pairs  # noqa: E402

SPECTRUM = ["hooks=[save_adapter,spectrum]", "hooks.spectrum.plots=false", "hooks.spectrum.intruders=false"]


def run(name: str, r: int, args, overrides: list[str]) -> Path:
    run_dir = args.out / f"{name}_r{r}"
    cmd = [sys.executable, "-m", "lorafit", *overrides, f"lora.r={r}", f"lora.alpha={2 * r}",
           f"train.max_steps={args.steps}", *SPECTRUM, f"hydra.run.dir={run_dir}", "train.overwrite=true", *args.extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def spectrum(run_dir: Path) -> dict:
    mods = json.loads((run_dir / "analysis" / "spectrum.json").read_text())["modules"]
    top = [m["singular_values"][0] ** 2 / sum(s * s for s in m["singular_values"]) for m in mods]
    by_type = {}
    for m in mods:
        by_type.setdefault(m["type"], []).append(m["effective_rank"])
    return {"effective_rank": float(np.mean([m["effective_rank"] for m in mods])),
            "r90": float(np.mean([m["r90"] for m in mods])), "top_energy": float(np.mean(top)),
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())}}


def summary_eval(run_dir: Path, keys) -> dict:
    ev = json.loads((run_dir / "summary.json").read_text())["eval"]
    return {k: v for k, v in ev.items() if k in keys}


# ---- grpo: recipe=grpo_topic against SFT on its prompts and labels ----

def topic_rows(out: Path) -> tuple[Path, Path, int]:
    """The grpo_topic recipe's prompts, filled as it fills them, with the real topic as the reply: SFT's train and
    eval files (the same articles as the recipe's splits), and the recipe's max_new_tokens."""
    from preference import compose

    from lorafit.data import load_splits, prompt_turns

    cfg = compose("recipe=grpo_topic")
    splits = load_splits(cfg)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, ds in (("train", splits.train), ("eval", splits.eval)):
        rows = [{"prompt": prompt_turns(r, cfg.data.prompt_template)[-1]["content"], "response": r["label"],
                 "label": r["label"]} for r in ds]
        (out / f"sft_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(out / f"sft_{name}.jsonl")
    return *paths, cfg.objective.max_new_tokens


def first_word_match(run_dir: Path, eval_file: Path, max_new_tokens: int) -> float:
    """Held-out exact match of an SFT adapter's greedy reply's first word: what grpo_topic's eval/reward/exact_match
    measures, through python -m lorafit.generate."""
    from lorafit.rewards import exact_match

    out = run_dir / "eval_generations.jsonl"
    subprocess.run([sys.executable, "-m", "lorafit.generate", str(run_dir), "--file", str(eval_file), "--out", str(out),
                    "--max-new-tokens", str(max_new_tokens), "--batch-size", "16"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # each eval row, with its output
    hits = exact_match(None, [r["output"] for r in rows], column="label", match="first_word", label=[r["label"] for r in rows])
    return float(np.mean(hits))


def grpo(args) -> dict:
    train, ev, new_tokens = topic_rows(args.out / "data")
    results = {}
    for r in args.r:
        s = run("sft", r, args, ["recipe=sft_jsonl", f"data.train_file={train}", f"data.eval_file={ev}", "eval.forgetting_file=null",
                                 "train.batch_size=4", "train.grad_accum=1", f"train.lr={args.sft_lr}", "train.eval_every=0"])
        g = run("grpo", r, args, ["recipe=grpo_topic", "train.eval_on_start=false", "train.eval_every=0", *([f"train.lr={args.lr}"] if args.lr else [])])
        results[f"grpo r={r}"] = {**spectrum(g), "eval": summary_eval(g, ("reward/exact_match", "reward"))}
        results[f"sft r={r}"] = {**spectrum(s), "eval": {"exact_match": first_word_match(s, ev, new_tokens),
                                                         **summary_eval(s, ("perplexity",))}}
    return results


# ---- dpo: the topic pairs, DPO against SFT on (prompt, chosen) ----

def dpo(args) -> dict:
    train, ev = write_pairs(args.out / "data")
    for src, dst in ((train, "sft_train.jsonl"), (ev, "sft_eval.jsonl")):
        rows = [json.loads(l) for l in src.read_text().splitlines()]
        (args.out / "data" / dst).write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n" for r in rows))
    data, common = args.out / "data", [f"train.lr={args.lr or 1e-4}", "train.batch_size=4", "train.grad_accum=2", "train.eval_every=0"]
    results = {}
    for r in args.r:
        s = run("sft", r, args, ["recipe=sft_jsonl", f"data.train_file={data / 'sft_train.jsonl'}",
                                 f"data.eval_file={data / 'sft_eval.jsonl'}", "eval.forgetting_file=null", *common])
        d = run("dpo", r, args, ["recipe=dpo_jsonl", f"data.train_file={train}", f"data.eval_file={ev}", *common])
        results[f"sft r={r}"] = {**spectrum(s), "eval": summary_eval(s, ("perplexity",))}
        results[f"dpo r={r}"] = {**spectrum(d), "eval": summary_eval(d, ("reward_accuracy",))}
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--objective", choices=("grpo", "dpo"), default="grpo")
    p.add_argument("--out", type=Path, default=None, help="default: /tmp/update_rank_OBJECTIVE")
    p.add_argument("--r", type=int, nargs="+", default=None, help="ranks (default: 1 4 32 for grpo, 16 for dpo)")
    p.add_argument("--steps", type=int, default=None, help="default: 40 for grpo (the recipe's), 60 for dpo")
    p.add_argument("--lr", type=float, default=None, help="grpo: default the recipe's; dpo: default 1e-4 (SFT too)")
    p.add_argument("--sft-lr", type=float, default=1e-4, help="grpo: the SFT run's learning rate")
    p.add_argument("extra", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args()
    args.out = args.out or Path(f"/tmp/update_rank_{args.objective}")
    args.r = args.r or ([1, 4, 32] if args.objective == "grpo" else [16])
    args.steps = args.steps or (40 if args.objective == "grpo" else 60)
    results = (grpo if args.objective == "grpo" else dpo)(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nΔW after {args.steps} steps: mean over modules")
    print(f"{'':12}{'eff. rank':>10}{'r90':>7}{'top-1 energy':>14}   held-out")
    for name, r in results.items():
        print(f"{name:12}{r['effective_rank']:>10.2f}{r['r90']:>7.1f}{r['top_energy']:>14.2f}   {r['eval']}")
    print("by module type (effective rank):", {n: r["by_type"] for n, r in results.items()})


if __name__ == "__main__":
    main()
