"""What shrinking costs in held-out quality, and "train at r=32, shrink to 8" against "train at r=8".

    .venv/bin/python bench/shrink_accuracy.py [--recipe bbc_news] [--small 8] [--big 32] [--out /tmp/shrink_acc] [OVERRIDE ...]

Trains the recipe at rank `small` and at rank `big` (alpha = 2r: the same scale), shrinks the big adapter with
`lorafit.shrink` to rank `small` and to energies 0.99 / 0.9 / 0.8, and evaluates every adapter on the recipe's
held-out split in one process, the same way (fp32, lorafit.compress._evaluate), so the rows compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(recipe: str, r: int, out: Path, extra: list[str]) -> Path:
    run_dir = out / f"r{r}"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        subprocess.run([sys.executable, "-m", "lorafit", f"recipe={recipe}", f"lora.r={r}", f"lora.alpha={2 * r}",
                        "hooks=[save_adapter]", f"hydra.run.dir={run_dir}", *extra], cwd=REPO, check=True)
    return run_dir / "adapter"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="bbc_news")
    p.add_argument("--small", type=int, default=8)
    p.add_argument("--big", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("/tmp/shrink_acc"))
    p.add_argument("extra", nargs="*", help="more overrides for both training runs")
    args = p.parse_args()
    from lorafit.compress import _evaluate
    from lorafit.generate import load
    from lorafit.shrink import shrink

    small, big = train(args.recipe, args.small, args.out, args.extra), train(args.recipe, args.big, args.out, args.extra)
    variants = {f"trained r={args.small}": small, f"trained r={args.big}": big}
    for name, kw in ([(f"r={args.big} shrunk to r={args.small}", {"rank": args.small})]
                     + [(f"r={args.big} shrunk to {e:.0%} energy", {"energy": e}) for e in (0.99, 0.9, 0.8)]):
        out = args.out / name.replace(" ", "_").replace("%", "pct")
        report = shrink(big, out, **kw)
        variants[name] = out
        print(f"{name}: {report['params_kept']:,} of {report['params']:,} LoRA params, energy kept {report['energy_kept']:.4f}")
    rows = []
    for name, adapter in variants.items():
        loaded = load(adapter)
        data = [o for o in args.extra if o.startswith("data.")]  # e.g. the SFT recipe's own files
        metrics = _evaluate(loaded.model, args.recipe, loaded.model.peft_config["default"].base_model_name_or_path, data)
        lora = sum(p.numel() for n, p in loaded.model.named_parameters() if "lora_" in n)
        rows.append({"adapter": name, "lora_params": lora, **{k: round(v, 4) for k, v in metrics.items() if k != "n"}})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
