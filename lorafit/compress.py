"""SVD for inference: replace dense Linear weights by two thin factors where that saves parameters.

`python -m lorafit.compress MODEL_DIR --out DIR (--energy 0.9 | --rank R) [--method exact|randomized]
 [--modules REGEX] [--eval RECIPE] [--overwrite]`

By Eckart–Young the best rank-k approximation of W keeps its top k singular triplets, with relative error
‖W - W_k‖_F / ‖W‖_F = sqrt(Σ_{i>k} σᵢ²) / ‖W‖_F. A d_out×d_in module becomes LowRankLinear(k) only when
k(d_in + d_out) < d_in·d_out. Reload with one line:

    model = lorafit.compress.load("DIR")
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.errors import UserError, atomic_dir, check_output

PLAN_FILE = "lowrank.json"
SKIP = re.compile(r"(^|\.)(classifier|score|lm_head|out_proj)(\.|$)")  # task heads stay dense


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is k×d_in (no bias), up is d_out×k with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.up(self.down(x))


def factor(W: torch.Tensor, energy: float | None, rank: int | None, method: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(up d_out×k, down k×d_in, stats) for the best rank-k approximation of W."""
    Wd = W.detach().double()
    total = float((Wd**2).sum())
    if method == "randomized":
        q = min(min(W.shape), (rank or 256) + 10)
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(Wd, q=q, niter=4)
        Vh = V.T
    else:
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
    if rank is None:
        cum = torch.cumsum(S**2, 0) / total
        hit = (cum >= energy - 1e-12).nonzero()
        k = int(hit[0]) + 1 if len(hit) else min(W.shape)  # randomized top-q missed the target: keep dense
    else:
        k = min(rank, len(S))
    kept = float((S[:k] ** 2).sum())
    root = S[:k].sqrt()
    up, down = (U[:, :k] * root).to(W.dtype), (root[:, None] * Vh[:k]).to(W.dtype)  # balanced split of σ
    return up, down, {"rank": k, "eckart_young_rel_error": math.sqrt(max(total - kept, 0.0) / total) if total else 0.0}


def compress_model(model, energy: float | None, rank: int | None, method: str = "exact", modules: str | None = None) -> dict:
    """Replace selected Linears in place; return the per-module plan and totals."""
    from tqdm.auto import tqdm

    pattern = re.compile(modules) if modules else None
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear
              and (pattern.search(n) if pattern else not SKIP.search(n))]
    if not chosen:
        raise UserError(f"--modules {modules!r} matches no Linear module")
    plan, before, after = {}, 0, 0
    for name, lin in tqdm(chosen, desc="compress", disable=len(chosen) < 32):
        d_out, d_in = lin.weight.shape
        up, down, stats = factor(lin.weight, energy, rank, method)
        k = stats["rank"]
        dense, thin = d_in * d_out, k * (d_in + d_out)
        entry = {**stats, "shape": [d_out, d_in], "params_before": dense, "flops_per_token_before": 2 * dense}
        if thin < dense:
            low = LowRankLinear(d_in, d_out, k, bias=lin.bias is not None).to(lin.weight.dtype)
            with torch.no_grad():
                low.up.weight.copy_(up)
                low.down.weight.copy_(down)
                if lin.bias is not None:
                    low.up.bias.copy_(lin.bias)
            W, up, down = (t.detach().double() for t in (lin.weight, low.up.weight, low.down.weight))
            measured = float((up @ down - W).norm() / W.norm().clamp_min(1e-30))
            model.set_submodule(name, low)
            entry.update(factored=True, params_after=thin, flops_per_token_after=2 * thin, measured_rel_error=measured)
        else:
            entry.update(factored=False, params_after=dense, flops_per_token_after=2 * dense, rank=min(d_out, d_in),
                         eckart_young_rel_error=0.0)
        before, after = before + entry["params_before"], after + entry["params_after"]
        plan[name] = entry
    return {"modules": plan, "params_before": before, "params_after": after,
            "factored": sum(e["factored"] for e in plan.values()), "energy": energy, "rank": rank, "method": method}


def load(path: str | Path, dtype=None):
    """Reload a compressed model: the original architecture with LowRankLinear where the plan says."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    plan = json.loads((path / PLAN_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if plan["task"] == "causal_lm" else AutoModelForSequenceClassification
    model = auto.from_config(config)
    for name, e in plan["modules"].items():
        if e["factored"]:
            d_out, d_in = e["shape"]
            old = model.get_submodule(name)
            model.set_submodule(name, LowRankLinear(d_in, d_out, e["rank"], bias=old.bias is not None))
    state = load_file(path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not _tied_key(model, k)]:
        raise UserError(f"{path}: weights do not match the plan (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return (model.to(dtype) if dtype else model).eval()  # from_config builds in training mode (dropout on)


def _tied_key(model, key: str) -> bool:
    return key.startswith("lm_head.") and getattr(model.config, "tie_word_embeddings", False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lorafit.compress", description="Truncated-SVD compression of Linear weights.")
    p.add_argument("model", help="a transformers model dir (e.g. a run's merged/), alias or hub id")
    p.add_argument("--out", required=True)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--energy", type=float, help="keep this fraction of each weight's energy Σσ² (e.g. 0.9)")
    size.add_argument("--rank", type=int, help="keep this rank in every selected module")
    p.add_argument("--method", default="exact", choices=["exact", "randomized"])
    p.add_argument("--modules", help="regex over module names (default: every Linear except task heads)")
    p.add_argument("--task", default=None, choices=["seq_cls", "causal_lm"], help="default: from the model's config")
    p.add_argument("--eval", metavar="RECIPE", help="report the recipe's eval metric before and after")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not empty and not a compressed model")
    return p.parse_args(argv)


@user_errors_as_one_line
def main(argv=None) -> dict:
    quiet_libraries()
    from transformers import AutoConfig

    from lorafit.models import auto_class, resolve

    args = parse_args(argv)
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UserError(f"--energy={args.energy} must be in (0, 1]")
    if args.rank is not None and args.rank <= 0:
        raise UserError(f"--rank={args.rank} must be a positive integer")
    src = resolve(args.model)
    out = check_output(Path(args.out), "compressed", [src], args.overwrite)  # before any work, never over the model
    config = AutoConfig.from_pretrained(src)
    task = args.task or ("causal_lm" if any(a.endswith("ForCausalLM") for a in config.architectures or []) else "seq_cls")
    model = auto_class(task).from_pretrained(src, use_safetensors=True).eval()
    before = _evaluate(model, args.eval, src) if args.eval else None
    report = compress_model(model, args.energy, args.rank, args.method, args.modules)
    report["task"] = task
    if args.eval:
        report["eval"] = {"recipe": args.eval, "before": before, "after": _evaluate(model, args.eval, src)}
    with atomic_dir(Path(args.out), "compressed", [src], args.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # config.json + model.safetensors (LowRankLinear weights)
        for f in Path(src).glob("*token*"):
            shutil.copy2(f, tmp / f.name)
        (tmp / PLAN_FILE).write_text(json.dumps(report, indent=1))
    print(f"factored {report['factored']} of {len(report['modules'])} modules: {report['params_before']:,} -> "
          f"{report['params_after']:,} params in them ({report['params_after'] / report['params_before']:.1%})")
    if args.eval:
        print(f"eval ({args.eval}): before {report['eval']['before']}  after {report['eval']['after']}")
    print(f"wrote {out}; reload with lorafit.compress.load({str(out)!r})")
    return report


def _evaluate(model, recipe: str, tokenizer_dir: str, overrides: tuple[str, ...] = ()) -> dict:
    """The recipe's eval metrics for `model` (its data, its tokenizer settings, with `overrides`), on this machine's
    devices."""
    from accelerate import Accelerator
    from omegaconf import OmegaConf

    from lorafit import data
    from lorafit.config import CONF_DIR
    from lorafit.models import build_tokenizer
    from lorafit.data import loader
    from lorafit.objectives import evaluate

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"recipe={recipe}", *overrides])
    cfg = OmegaConf.merge(cfg, {"model": {"name": tokenizer_dir}})
    tok = build_tokenizer(cfg.model)
    _, eval_ds = data.tokenize(data.load_splits(cfg), tok, cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    batches = loader(eval_ds, cfg.train.eval_batch_size, list(range(len(eval_ds))), tok.pad_token_id, acc, False)
    return evaluate(model.to(acc.device), batches, cfg, acc)


if __name__ == "__main__":
    main()
