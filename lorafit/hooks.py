"""Post-training hooks: plain functions of a RunContext, run once on the main process in HOOK_ORDER.

Select them with `hooks=[save_adapter,spectrum,merge]`; each one's options are `hooks.<name>.*`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf


@dataclass
class RunContext:
    cfg: object
    model: object  # the trained PeftModel (unwrapped from accelerate)
    tokenizer: object
    run_dir: Path
    accelerator: object
    summary: dict  # written to summary.json after the hooks; hooks add their results here
    probe: dict  # a small collated eval batch, for checks that compare logits
    labels: list[str] | None


def save_adapter(ctx: RunContext) -> None:
    """Plain PEFT format: loads with PeftModel.from_pretrained(base, run_dir/"adapter")."""
    out = ctx.run_dir / ctx.cfg.hooks.save_adapter.dir
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ctx.model.save_pretrained(tmp, safe_serialization=True)
    ctx.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # the final adapter appears whole or not at all
    ctx.summary["adapter_dir"] = str(out)


def spectrum(ctx: RunContext) -> None:
    """analysis/spectrum.json (+ report and plots): exact singular values of every ΔW."""
    from peft.utils import get_peft_model_state_dict

    from lorafit.analysis import report

    config = ctx.model.peft_config["default"].to_dict()
    doc = report.analyze(config, get_peft_model_state_dict(ctx.model), energy=ctx.cfg.hooks.spectrum.energy)
    path = report.write(doc, ctx.run_dir / "analysis")
    ctx.summary["spectrum"] = {"path": str(path), "modules": len(doc["modules"]),
                               "mean_effective_rank": _mean(m["effective_rank"] for m in doc["modules"]),
                               "mean_r90": _mean(m["r90"] for m in doc["modules"])}


def merge(ctx: RunContext) -> None:
    """merged/: the adapter merged into a float copy of the base, verified on a probe batch."""
    from lorafit.merge import MERGE_DTYPES, merge_and_verify
    from lorafit.models import build_model

    hook = ctx.cfg.hooks.merge
    adapter_dir = ctx.run_dir / (ctx.cfg.hooks.save_adapter.dir if ctx.cfg.hooks.save_adapter else "adapter")
    if not adapter_dir.is_dir():
        save_adapter(_with_save_adapter(ctx))
    float_base = OmegaConf.merge(ctx.cfg, {"model": {"dtype": MERGE_DTYPES[hook.dtype]}})
    base = build_model(float_base, ctx.labels, quantize=False)
    ctx.summary["merge"] = merge_and_verify(base, adapter_dir, ctx.run_dir / hook.dir, ctx.probe, hook.dtype,
                                            tokenizer=ctx.tokenizer, reference=ctx.model)


def _with_save_adapter(ctx: RunContext) -> RunContext:
    cfg = OmegaConf.merge(ctx.cfg, {"hooks": {"save_adapter": {"dir": "adapter"}}})
    return RunContext(**{**ctx.__dict__, "cfg": cfg})


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


HOOK_ORDER = {"save_adapter": save_adapter, "spectrum": spectrum, "merge": merge}


def run_hooks(ctx: RunContext) -> None:
    for name, hook in HOOK_ORDER.items():
        if ctx.cfg.hooks[name] is not None:
            hook(ctx)
