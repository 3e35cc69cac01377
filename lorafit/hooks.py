"""Post-training hooks: plain functions of a RunContext, run once on the main process in HOOK_ORDER.

Select them with `hooks=[save_adapter,spectrum,merge]`; each one's options are `hooks.<name>.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lorafit import adapters
from lorafit.errors import atomic_dir, check_output
from lorafit.metrics import mean


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


def adapter_out(cfg, run_dir: Path) -> tuple[str, Path]:
    """(config key, dir) of what save_adapter writes: the adapter, or with lora=full the whole model."""
    if cfg.lora.method == "full":
        return "hooks.save_adapter", run_dir / "model"
    if cfg.hooks.save_adapter is None:  # the merge hook saves the adapter to adapter/ first (see _saved_adapter)
        return "hooks.merge", run_dir / "adapter"
    return "hooks.save_adapter.dir", run_dir / cfg.hooks.save_adapter.dir


def check_output_dirs(cfg, run_dir: Path) -> None:
    """Before training: every dir the selected hooks will write may be written (errors.check_output), so one that
    names a foreign non-empty folder, the run dir or a folder above it is refused now, not after the training."""
    merges = cfg.hooks.merge is not None and cfg.lora.method != "full"  # lora=full has nothing to merge
    if cfg.hooks.save_adapter is not None or merges:
        key, out = adapter_out(cfg, run_dir)
        check_output(out, "adapter", _run_inputs(run_dir), flag=key)
    if merges:
        check_output(run_dir / cfg.hooks.merge.dir, "merged", _run_inputs(run_dir), flag="hooks.merge.dir")


def _run_inputs(run_dir: Path) -> tuple[Path, ...]:
    """What no hook output may replace: the run dir (its config, metrics, summary) and its checkpoints."""
    return run_dir, run_dir / "checkpoints"


def save_adapter(ctx: RunContext) -> None:
    """Plain PEFT format: loads with PeftModel.from_pretrained(base, run_dir/"adapter").
    With lora=full there is no adapter: the whole model goes to run_dir/model instead."""
    key, out = adapter_out(ctx.cfg, ctx.run_dir)
    # The final adapter appears whole or not at all; an earlier one (a resumed run's) is replaced, nothing else.
    with atomic_dir(out, "adapter", _run_inputs(ctx.run_dir), flag=key) as tmp:
        adapters.save(ctx.model, ctx.cfg, ctx.run_dir, tmp, ctx.labels)
        ctx.tokenizer.save_pretrained(tmp)
    ctx.summary["adapter_dir"] = str(out)


def spectrum(ctx: RunContext) -> None:
    """analysis/: exact singular values of every ΔW, rank metrics against W0, rank advice, report and plots."""
    if ctx.cfg.lora.method == "full":
        return  # no low-rank factors to analyze
    from peft.utils import get_peft_model_state_dict

    from lorafit.analysis import base, report
    from lorafit.analysis.spectrum import INTRUDER_EPS, INTRUDER_K, read_adapter

    hook = ctx.cfg.hooks.spectrum
    if ctx.cfg.lora.init in adapters.CONVERTED_INITS:
        # The real update is s·B·A − s·B0·A0 on the original W, which the saved (converted) adapter holds; the model
        # in memory has A, B on the residual W − s·B0·A0 instead.
        config, state = read_adapter(_saved_adapter(ctx))
        weights = base.from_dir(ctx.cfg.model.name, config.get("fan_in_fan_out", False))
    else:
        config, state = ctx.model.peft_config["default"].to_dict(), get_peft_model_state_dict(ctx.model)
        weights = base.from_model(ctx.model, config.get("fan_in_fan_out", False))
    doc = report.analyze(config, state, energy=hook.energy, base=weights,
                         intruders=(INTRUDER_K, INTRUDER_EPS) if hook.intruders else None)
    if ctx.summary.get("auto_rank"):  # lora.r=auto: the report says where the ranks of the adapter came from
        doc["auto_rank"] = {k: v for k, v in ctx.summary["auto_rank"].items() if k not in ("modules", "ranks")}
    files = report.write(doc, ctx.run_dir / "analysis", plots=hook.plots)
    ctx.summary["spectrum"] = {"dir": str(ctx.run_dir / "analysis"), "modules": len(doc["modules"]),
                               "mean_effective_rank": mean(m["effective_rank"] for m in doc["modules"]),
                               "mean_r90": mean(m["r90"] for m in doc["modules"]),
                               "advice": doc["advice"].get("override"), "summary": report.summary_line(doc)}
    _log_analysis(ctx, doc, [f for f in files if f.suffix == ".png"])


def _log_analysis(ctx: RunContext, doc: dict, images: list[Path]) -> None:
    """The plots as images and the per-module metrics as a table, on the active tracker."""
    backend = ctx.cfg.logging.backend
    if backend == "wandb":
        import wandb

        keys = ["name", "type", "layer", "rank", "effective_rank", "r90", "r99", "stable_rank", "fro_norm", "suggested_rank"]
        table = wandb.Table(columns=keys, data=[[m[k] for k in keys] for m in doc["modules"]])
        ctx.accelerator.get_tracker("wandb", unwrap=True).log(
            {"spectrum/modules": table, **{f"spectrum/{p.stem}": wandb.Image(str(p)) for p in images}})
    elif backend == "tensorboard":
        import matplotlib.image

        writer = ctx.accelerator.get_tracker("tensorboard", unwrap=True)
        for p in images:
            writer.add_image(f"spectrum/{p.stem}", matplotlib.image.imread(p)[..., :3], dataformats="HWC")


def merge(ctx: RunContext) -> None:
    """merged/: the adapter merged into a float (or dequantized) copy of the base, verified on a probe batch."""
    from lorafit.merge import merge_and_verify, merge_base

    hook = ctx.cfg.hooks.merge
    if ctx.cfg.lora.method == "full":
        return  # nothing to merge: save_adapter already wrote the full model
    ctx.summary["merge"] = merge_and_verify(merge_base(ctx.cfg, ctx.labels, hook.dtype), [_saved_adapter(ctx)],
                                            ctx.run_dir / hook.dir, ctx.probe, ctx.cfg, hook.dtype,
                                            tokenizer=ctx.tokenizer, reference=ctx.model, flag="hooks.merge.dir",
                                            inputs=_run_inputs(ctx.run_dir))
    if hook.gguf is not None:
        from lorafit.export import to_gguf

        ctx.summary["merge"]["gguf"] = to_gguf(ctx.run_dir / hook.dir, hook.gguf)


def _saved_adapter(ctx: RunContext) -> Path:
    """The adapter dir as save_adapter writes it (saving it to adapter/ first when that hook was not selected)."""
    adapter_dir = ctx.run_dir / (ctx.cfg.hooks.save_adapter.dir if ctx.cfg.hooks.save_adapter else "adapter")
    if not adapter_dir.is_dir():
        cfg = OmegaConf.merge(ctx.cfg, {"hooks": {"save_adapter": {"dir": "adapter"}}})
        save_adapter(RunContext(**{**ctx.__dict__, "cfg": cfg}))
    return adapter_dir


HOOK_ORDER = {"save_adapter": save_adapter, "spectrum": spectrum, "merge": merge}


def run_hooks(ctx: RunContext) -> None:
    for name, hook in HOOK_ORDER.items():
        if ctx.cfg.hooks[name] is not None:
            hook(ctx)
