"""lora.r=auto against a fixed-rank sweep: held-out metric, adapter parameters and wall time (probe included).

    .venv/bin/python bench/auto_rank.py [--recipe bbc_news] [--ranks 2 4 8 16 32] [--r-max 32] [--out /tmp/rank_bench]

Every run uses alpha = 2r (the same scale 2 for every rank; for auto, alpha = 2·r_max keeps it). Runs whose
summary.json exists are reused, so bench/shrink_accuracy.py can share the r=8 and r=32 runs (same --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    if not (run_dir / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "lorafit", f"recipe={recipe}", "hooks=[save_adapter]",
                        f"hydra.run.dir={run_dir}", *overrides], cwd=REPO, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="bbc_news")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--r-max", type=int, default=32)
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--out", type=Path, default=Path("/tmp/rank_bench"))
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    rows = []
    for r in args.ranks:
        s = run(args.recipe, args.out / f"r{r}", [f"lora.r={r}", f"lora.alpha={2 * r}", *args.extra])
        rows.append({"run": f"r={r}", "metric": s["primary_metric"], "value": s["eval"][s["primary_metric"]],
                     "trainable": s["trainable_params"], "wall_s": round(s["wall_s"], 1)})
    s = run(args.recipe, args.out / "auto", ["lora.r=auto", f"lora.r_max={args.r_max}", f"lora.alpha={2 * args.r_max}",
                                             f"lora.auto_energy={args.energy}", *args.extra])
    a = s["auto_rank"]
    rows.append({"run": f"auto (r_max={args.r_max}, {args.energy:.0%}): r={a['global_r']} + {len(a['rank_pattern'])} "
                        "per-module", "metric": s["primary_metric"], "value": s["eval"][s["primary_metric"]],
                 "trainable": s["trainable_params"], "wall_s": round(s["wall_s"], 1),  # the probe included
                 "probe_steps": a["probe_steps"], "probe_wall_s": round(a["probe_wall_s"], 1)})
    for row in rows:
        print(json.dumps(row))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
