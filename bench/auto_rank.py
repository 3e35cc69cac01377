"""lora.r=auto against a fixed-rank sweep, over seeds: held-out metric, adapter parameters and wall time.

    .venv/bin/python bench/auto_rank.py [--recipe bbc_news] [--ranks 2 4 8 16 32] [--seeds 0 1 2] [--r-max 32]
                                        [--shrink-at 0.5] [--energy 0.9] [--moments project [reset]]
                                        [--out /tmp/rank26] [OVERRIDE ...]

Every run uses alpha = 2r (the same scale 2 for every rank; for auto, alpha = 2·r_max keeps it through the shrink).
Runs whose summary.json exists are reused, so a sweep can be stopped and continued. bench/adalora.py writes its rows
to the same --out, and they are shown beside these.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    p.add_argument("--ranks", type=int, nargs="*", default=[2, 4, 8, 16, 32])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--r-max", type=int, default=32)
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--shrink-at", type=float, default=0.5)
    p.add_argument("--moments", nargs="*", default=["project"])
    p.add_argument("--out", type=Path, default=Path("/tmp/rank26"))
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        out = args.out / f"s{seed}"
        for r in args.ranks:
            rows.setdefault(f"r={r}", []).append(run(args.recipe, out / f"r{r}", [
                f"lora.r={r}", f"lora.alpha={2 * r}", f"train.seed={seed}", *args.extra]))
        for moments in args.moments:
            name = f"auto_{moments}_at{args.shrink_at:g}_e{args.energy:g}" + ("" if args.r_max == 32 else f"_rmax{args.r_max}")
            rows.setdefault(f"auto (r_max={args.r_max}, {moments}, shrink at {args.shrink_at:.0%} to {args.energy:.0%} "
                            "energy)", []).append(
                run(args.recipe, out / name, [
                    "lora.r=auto", f"lora.r_max={args.r_max}", f"lora.alpha={2 * args.r_max}", f"lora.auto_energy={args.energy}",
                    f"lora.auto_shrink_at={args.shrink_at}", f"lora.auto_moments={moments}", f"train.seed={seed}", *args.extra]))
    for path in sorted(args.out.glob("s*/adalora*/summary.json")):  # bench/adalora.py's runs
        s = json.loads(path.read_text())
        if s["seed"] in args.seeds:
            rows.setdefault(f"AdaLoRA ({path.parent.name})", []).append(s)
    table = []
    for name, runs in rows.items():
        metric = runs[0]["primary_metric"]
        values = [s["eval"][metric] for s in runs]
        table.append({"run": name, "metric": metric, "values": values, "mean": statistics.mean(values),
                      "trainable": [s["trainable_params"] for s in runs],
                      "wall_s": [round(s["wall_s"], 1) for s in runs],
                      **({"shrink_step": runs[0]["auto_rank"]["step"]} if runs[0].get("auto_rank") else {})})
    for row in table:
        print(json.dumps(row))
    (args.out / f"results_{args.recipe}_at{args.shrink_at:g}_e{args.energy:g}_rmax{args.r_max}.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
