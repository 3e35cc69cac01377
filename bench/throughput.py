"""Benchmark: lorafit vs a plain HF Trainer + PEFT script on the same job, side by side, alternating runs.

Jobs
  a  bbc_news: sequence classification on MiniLM-L6, LoRA r=8, alpha=16 on query,value, batch 16, max length 128,
     lr 1e-3
  b  sft: causal-LM SFT on SmolLM2-135M over variable-length prompt/response pairs built from BBC News, LoRA r=8,
     alpha=16 on q_proj,v_proj
  Model, rank, targets, batch, lr, schedule and steps are the job: both sides get them in both views.
Comparisons
  defaults  each side as its user would run it otherwise: lorafit's recipe (its precision, dropout, init, length
            grouping) vs the peer's typical script (fp32 as HF Trainer defaults, lora_dropout 0.1, the checkpoint's
            own dropout, peft's default init, no length grouping)
  equal     the same hyperparameters: peft's default init on both sides, the same dropout, and the same precision
            (the peer gets bf16=True where lorafit's `auto` picks bf16): the engineering view
Each run is a fresh subprocess that reports its own peak RSS; throughput counts training steps only (evaluation
is timed separately on both sides). Ratios are lorafit / peer, the median over alternating pairs.

    .venv/bin/python bench/throughput.py [--jobs a b] [--modes defaults equal] [--pairs 2] [--steps-a 60] [--steps-b 40] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lorafit.hardware import resolve_precision  # noqa: E402

# "equal" runs both sides in the precision lorafit's `auto` picks on this machine (bf16 where the CPU has it)
EQUAL_BF16 = resolve_precision("auto") == "bf16"
LORAFIT_FLAGS = {  # what "defaults" and "equal" mean on the lorafit side, per job
    ("a", "defaults"): ["recipe=bbc_news"],
    # equal: peft's default init (kaiming A) as the peer has, its dropout, the same precision
    ("a", "equal"): ["recipe=bbc_news", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "model.dropout=null",
                     "lora.init=default"],  # the peer's r=8, alpha=16 (lorafit's default is r=16 since 2026-11-24)
    ("b", "defaults"): ["recipe=sft_jsonl"],
    ("b", "equal"): ["recipe=sft_jsonl", "lora.dropout=0.1", "lora.init=default"],  # SmolLM2's own dropout is 0
}
PEER_FLAGS = {("a", "defaults"): {"lora_dropout": 0.1}, ("a", "equal"): {"lora_dropout": 0.1, "bf16": EQUAL_BF16},
              ("b", "defaults"): {"lora_dropout": 0.1}, ("b", "equal"): {"lora_dropout": 0.1, "bf16": EQUAL_BF16}}


def sft_files(work: Path, n_train: int = 400, n_eval: int = 32) -> tuple[Path, Path]:
    """Prompt/response pairs of widely varying length: 1 to 12 sentences of an article, answered with its topic."""
    import random

    from lorafit.data import _bbc_news

    splits, rng = _bbc_news(n_eval), random.Random(0)
    out = []
    for ds, n in ((splits.train, n_train), (splits.eval, n_eval)):
        rows = []
        for text, label in zip(ds["text"][:n], ds["label"][:n]):
            sentences = text.replace("\n", " ").split(". ")
            k = rng.randint(1, 12)
            rows.append({"prompt": "What is this news article about?\n\n" + ". ".join(sentences[:k]) + ".",
                         "response": f"It is a {splits.labels[label]} story: {sentences[0][:80]}."})
        path = work / f"sft_{'train' if ds is splits.train else 'eval'}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return tuple(out)


def job_settings(job: str, steps: int, work: Path, tiny: bool) -> dict:
    if job == "a":
        return {"model": "tiny-bert" if tiny else "minilm-l6", "task": "seq_cls", "steps": steps, "batch": 16,
                "max_length": 128, "lr": 1e-3, "targets": ["query", "value"], "eval_size": 64 if tiny else 500}
    # Exactly one epoch (steps x batch rows): both sides then see the same rows, so samples/s compare like for like.
    train, ev = sft_files(work, 96 if tiny else steps * 4, 16 if tiny else 32)
    return {"model": "tiny-llama" if tiny else "smollm2-135m", "task": "causal_lm", "steps": steps, "batch": 4,
            "max_length": 512, "lr": 2e-4, "targets": ["q_proj", "v_proj"], "train_file": str(train),
            "eval_file": str(ev)}


def lorafit_overrides(s: dict, flags: list[str]) -> list[str]:
    o = [*flags, f"model.name={s['model']}", f"train.max_steps={s['steps']}", f"train.batch_size={s['batch']}",
         f"data.max_length={s['max_length']}", f"train.lr={s['lr']}", f"lora.target_modules=[{','.join(s['targets'])}]",
         "lora.r=8", "lora.alpha=16", "train.grad_accum=1", "train.eval_every=0", "train.warmup_ratio=0.06",
         "train.scheduler=linear", "hooks=[]", "train.seed=42"]
    if s["task"] == "seq_cls":
        o.append(f"data.eval_size={s['eval_size']}")
    else:
        o += [f"data.train_file={s['train_file']}", f"data.eval_file={s['eval_file']}", "train.eval_batch_size=8"]
    return o


SIDE = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
side, s, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[4])
if side == "lorafit":
    from hydra import compose, initialize_config_dir
    from lorafit.config import CONF_DIR
    from lorafit.run import run
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=extra)
    run(cfg, run_dir=sys.argv[5])
    summ = json.load(open(sys.argv[5] + "/summary.json"))
    res = {k: summ[k] for k in ("samples_per_s", "tokens_per_s", "eval", "precision", "mfu")}
else:
    res = __import__("peer").main(s, extra)
import re  # VmHWM: this process's own peak (ru_maxrss would inherit the parent's across fork+exec)
res["rss_mb"] = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print("RESULT " + json.dumps(res))
'''


def run_side(side: str, s: dict, extra, run_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", SIDE, side, json.dumps(s), str(REPO / "bench"), json.dumps(extra), str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT ")).split(" ", 1)[1])


def startup_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorafit", "--cfg", "job"], cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - t0


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--modes", nargs="+", default=["defaults", "equal"], choices=["defaults", "equal"])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps-a", type=int, default=60)
    p.add_argument("--steps-b", type=int, default=40)
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps: checks the harness, not speed")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    rows = []
    for job in args.jobs:
        s = job_settings(job, args.steps_a if job == "a" else args.steps_b, work, args.tiny)
        for mode in args.modes:
            runs = {"lorafit": [], "peer": []}
            for i in range(args.pairs):  # alternate, so drifts in machine load hit both sides alike
                for side in ("lorafit", "peer") if i % 2 == 0 else ("peer", "lorafit"):
                    extra = lorafit_overrides(s, LORAFIT_FLAGS[job, mode]) if side == "lorafit" else PEER_FLAGS[job, mode]
                    runs[side].append(run_side(side, s, extra, work / f"{job}-{mode}-{side}-{i}"))
            ratio = lambda key: statistics.median(l[key] / p_[key] for l, p_ in zip(runs["lorafit"], runs["peer"]))
            metric = "accuracy" if s["task"] == "seq_cls" else "perplexity"
            rows.append({"job": job, "mode": mode, "model": s["model"], "steps": s["steps"], "metric": metric,
                         "samples_per_s": ratio("samples_per_s"), "tokens_per_s": ratio("tokens_per_s"),
                         "rss": ratio("rss_mb"), "runs": runs})
    print(f"machine: {platform.machine()}, {__import__('os').cpu_count()} cores; python -m lorafit --cfg job: "
          f"{startup_seconds():.2f} s")
    print(f"{'job':<4}{'mode':<10}{'model':<14}{'steps':>6}{'samples/s':>11}{'tokens/s':>10}{'peak RSS':>10}"
          f"   {'metric (lorafit | peer, per pair)'}")
    for r in rows:
        ml = " ".join(f"{x['eval'][r['metric']]:.3f}" for x in r["runs"]["lorafit"])
        mp = " ".join(f"{x['eval'][r['metric']]:.3f}" for x in r["runs"]["peer"])
        print(f"{r['job']:<4}{r['mode']:<10}{r['model']:<14}{r['steps']:>6}{r['samples_per_s']:>10.2f}x"
              f"{r['tokens_per_s']:>9.2f}x{r['rss']:>9.2f}x   {r['metric']}: {ml} | {mp}")
    for r in rows:
        for side in ("lorafit", "peer"):
            sps = [x["samples_per_s"] for x in r["runs"][side]]
            rss = " ".join(f"{x['rss_mb']:.0f}" for x in r["runs"][side])
            ran = ""
            if side == "lorafit":
                ran = f"; {r['runs'][side][0]['precision']}, MFU " + " ".join(f"{x['mfu']:.1%}" for x in r["runs"][side])
            elif PEER_FLAGS[r["job"], r["mode"]].get("bf16"):
                ran = "; bf16"
            print(f"  {r['job']}/{r['mode']}/{side}: samples/s {' '.join(f'{v:.2f}' for v in sps)}; peak RSS MiB {rss}{ran}")
    return rows


if __name__ == "__main__":
    main()
