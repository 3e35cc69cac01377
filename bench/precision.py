"""Benchmark: lorafit in fp32 vs bf16 autocast on this machine, same job, same steps: metric, speed, MFU.

Jobs as in throughput.py: a = the default bbc_news job (150 steps, the recipe's own), b = SFT on SmolLM2-135M
(one epoch of 160 rows). Runs alternate fp32 / bf16 so drifts in machine load hit both alike.

    .venv/bin/python bench/precision.py [--jobs a b] [--pairs 1] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import job_settings, lorafit_overrides, run_side  # noqa: E402

PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny models and few steps: checks the harness, not speed")
    args = p.parse_args(argv)
    work, rows = Path(tempfile.mkdtemp(prefix="lorafit-precision-")), []
    for job in args.jobs:
        steps = (8 if args.tiny else 150) if job == "a" else (8 if args.tiny else 40)
        s = job_settings(job, steps, work, args.tiny)
        base = ["recipe=bbc_news"] if job == "a" else ["recipe=sft_jsonl"]
        overrides = lorafit_overrides(s, base)
        if job == "a":  # the default job exactly as `make run` trains it: its recipe's lr and rank
            overrides = [o for o in overrides if not o.startswith(("train.lr=", "lora.r=", "lora.alpha="))]
        runs = {name: [] for name in PRECISIONS}
        for i in range(args.pairs):
            for name in PRECISIONS if i % 2 == 0 else reversed(PRECISIONS):
                extra = [*overrides, f"train.mixed_precision={PRECISIONS[name]}"]
                runs[name].append(run_side("lorafit", s, extra, work / f"{job}-{name}-{i}"))
        metric = "accuracy" if s["task"] == "seq_cls" else "perplexity"
        rows.append({"job": job, "model": s["model"], "steps": steps, "metric": metric, "runs": runs,
                     "speedup": statistics.median(b["samples_per_s"] / f["samples_per_s"]
                                                  for f, b in zip(runs["fp32"], runs["bf16"]))})
    print(f"{'job':<4}{'model':<14}{'steps':>6}  {'bf16/fp32 samples/s':>20}   metric fp32 | bf16   MFU fp32 | bf16")
    for r in rows:
        m = {k: " ".join(f"{x['eval'][r['metric']]:.4f}" for x in v) for k, v in r["runs"].items()}
        u = {k: " ".join(f"{x['mfu']:.0%}" for x in v) for k, v in r["runs"].items()}
        print(f"{r['job']:<4}{r['model']:<14}{r['steps']:>6}  {r['speedup']:>19.2f}x   {r['metric']} {m['fp32']} | "
              f"{m['bf16']}   {u['fp32']} | {u['bf16']}")
    return rows


if __name__ == "__main__":
    main()
