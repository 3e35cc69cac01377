"""Forgetting on SmolLM2 against rank and intruder dimensions, and what shrinking does to it.

    .venv/bin/python bench/forgetting.py [--ranks 4 16 64] [--out /tmp/forgetting_bench] [OVERRIDE ...]

Trains the smollm2_bbc recipe (causal LM on BBC News text) at each rank, alpha = 2r, with
eval.forgetting_file = prose paragraphs of Python's own reference documentation (pydoc_data, shipped with CPython:
English text far from news). Each run reports the held-out BBC perplexity, the loss on that text after vs before
(`forgetting`), and from its spectrum hook the intruder-dimension count (top 10, eps 0.5). The largest rank's
adapter is then shrunk to 90% energy and its forgetting and perplexity measured again in this process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def general_text(path: Path, n: int = 64) -> Path:
    import pydoc_data.topics as topics

    paras = [p.strip() for doc in topics.topics.values() for p in doc.split("\n\n")]
    prose = [" ".join(p.split()) for p in paras if len(p) > 300 and not p.startswith((" ", "*", "="))]
    path.write_text("\n\n".join(prose[:n]))
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--out", type=Path, default=Path("/tmp/forgetting_bench"))
    p.add_argument("extra", nargs="*", help="more overrides for every run, e.g. train.max_steps=300")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text = general_text(args.out / "general.txt")
    common = ["recipe=smollm2_bbc", f"eval.forgetting_file={text}", "eval.forgetting_rows=32", "hooks=[save_adapter,spectrum]",
              "hooks.spectrum.plots=false"]
    rows = []
    for r in args.ranks:
        run_dir = args.out / f"r{r}"
        if not (run_dir / "summary.json").is_file():
            subprocess.run([sys.executable, "-m", "lorafit", *common, f"lora.r={r}", f"lora.alpha={2 * r}",
                            f"hydra.run.dir={run_dir}", *args.extra], cwd=REPO, check=True)
        s = json.loads((run_dir / "summary.json").read_text())
        doc = json.loads((run_dir / "analysis" / "spectrum.json").read_text())
        rows.append({"adapter": f"r={r}", "lora_params": s["trainable_params"], "perplexity": round(s["eval"]["perplexity"], 3),
                     "forgetting": round(s["eval"]["forgetting"], 4), "base_loss": round(s["eval"]["forgetting_base_loss"], 4),
                     "intruders": doc["intruders"]["total"], "modules_with_intruders": doc["intruders"]["modules_with_intruders"],
                     "modules": doc["intruders"]["modules"]})
        print(json.dumps(rows[-1]), flush=True)
    rows.append(_shrunk(args.out / f"r{max(args.ranks)}", args.out / "shrunk90", text))
    print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


def _shrunk(run_dir: Path, out: Path, text: Path) -> dict:
    """The largest adapter at 90% energy: its perplexity and forgetting, the way the training run measured them."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from lorafit import data
    from lorafit.analysis import base as base_weights
    from lorafit.analysis.report import analyze
    from lorafit.analysis.spectrum import read_adapter
    from lorafit.generate import load
    from lorafit.shrink import shrink
    from lorafit.objectives import evaluate
    from lorafit.train import forgetting_eval

    report = shrink(run_dir / "adapter", out, energy=0.9)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.train.mixed_precision = "no"
    loaded = load(out)
    acc = Accelerator(cpu=True, mixed_precision="bf16")  # the precision the runs evaluated in on this CPU
    _, eval_ds = data.tokenize(data.load_splits(cfg), loaded.tokenizer, cfg)
    batches = data.loader(eval_ds, cfg.train.eval_batch_size, list(range(len(eval_ds))), loaded.tokenizer.pad_token_id, acc, False)
    model = acc.prepare(loaded.model)
    ppl = evaluate(model, batches, cfg, acc)["perplexity"]
    forget = forgetting_eval(data.general_text(cfg, loaded.tokenizer), loaded.tokenizer.pad_token_id, cfg, acc)(model, 0)
    config, state = read_adapter(out)
    doc = analyze(config, state, base=base_weights.from_dir(cfg.model.name))
    return {"adapter": f"{run_dir.name} shrunk to 90% energy", "lora_params": report["params_kept"], "perplexity": round(ppl, 3),
            "forgetting": round(forget["forgetting"], 4), "base_loss": round(forget["forgetting_base_loss"], 4),
            "intruders": doc["intruders"]["total"], "modules_with_intruders": doc["intruders"]["modules_with_intruders"],
            "modules": doc["intruders"]["modules"]}


if __name__ == "__main__":
    main()
