"""How low-rank is a DPO update? The spectrum of ΔW after DPO against SFT, same model, data, rank and budget.

    .venv/bin/python bench/preference_rank.py [--out /tmp/preference_rank] [--steps 60] [--r 16] [OVERRIDE ...]

"LoRA Without Regret" (Thinking Machines, 2025) found that RL needs very little capacity. This asks the same of DPO
with lorafit's spectrum hook: SmolLM2-135M, the BBC News topic pairs of bench/preference_demo.py, LoRA at rank r on
all linear layers, the same steps, batch and learning rate. SFT trains on (prompt, chosen) as prompt/response
rows; DPO on (prompt, chosen, rejected). For each run: the mean effective rank (exp of the entropy of the
normalized singular values) and r90 (directions holding 90% of ΔW's energy) over every adapted module, the share
of the energy in the top direction, and the held-out result.
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


def run(name: str, args, overrides: list[str]) -> Path:
    run_dir = args.out / name
    cmd = [sys.executable, "-m", "lorafit", *overrides, f"lora.r={args.r}", f"lora.alpha={2 * args.r}",
           f"train.max_steps={args.steps}", f"train.lr={args.lr}", "train.batch_size=4", "train.grad_accum=2",
           "train.eval_every=0", "hooks=[save_adapter,spectrum]", "hooks.spectrum.plots=false",
           "hooks.spectrum.intruders=false", f"hydra.run.dir={run_dir}", "train.overwrite=true", *args.extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def spectrum(run_dir: Path) -> dict:
    mods = json.loads((run_dir / "analysis" / "spectrum.json").read_text())["modules"]
    top = [m["singular_values"][0] ** 2 / sum(s * s for s in m["singular_values"]) for m in mods]
    by_type = {}
    for m in mods:
        by_type.setdefault(m["type"], []).append(m["effective_rank"])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"effective_rank": float(np.mean([m["effective_rank"] for m in mods])),
            "r90": float(np.mean([m["r90"] for m in mods])), "top_energy": float(np.mean(top)),
            "by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
            "eval": {k: v for k, v in summary["eval"].items() if k in ("reward_accuracy", "perplexity")}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("/tmp/preference_rank"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("extra", nargs="*")
    args = p.parse_args()
    train, ev = write_pairs(args.out / "data")
    for src, dst in ((train, "sft_train.jsonl"), (ev, "sft_eval.jsonl")):
        rows = [json.loads(l) for l in src.read_text().splitlines()]
        (args.out / "data" / dst).write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n" for r in rows))
    data = args.out / "data"
    results = {
        "sft": spectrum(run("sft", args, ["recipe=sft_jsonl", f"data.train_file={data / 'sft_train.jsonl'}",
                                          f"data.eval_file={data / 'sft_eval.jsonl'}", "eval.forgetting_file=null"])),
        "dpo": spectrum(run("dpo", args, ["recipe=dpo_jsonl", f"data.train_file={train}", f"data.eval_file={ev}"])),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nΔW at r={args.r}, {args.steps} steps, lr {args.lr}: mean over modules")
    print(f"{'':6}{'eff. rank':>10}{'r90':>7}{'top-1 energy':>14}   eval")
    for name, r in results.items():
        print(f"{name:6}{r['effective_rank']:>10.2f}{r['r90']:>7.1f}{r['top_energy']:>14.2f}   {r['eval']}")
    print("by module type (effective rank):", {n: r["by_type"] for n, r in results.items()})


if __name__ == "__main__":
    main()
