"""One run, top to bottom: validate -> model & data -> LoRA -> train -> hooks -> summary. No step goes back."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from lorafit.cli import quiet_libraries
from lorafit.config import validate
from lorafit.errors import UserError

log = logging.getLogger("lorafit")

# A key named like a credential: its last word is one (hf_token, wandb_api_key, password), not a count of tokens
# (eval.max_new_tokens) nor a token id (pad_token_id).
SECRET_KEY = re.compile(r"(^|_)(token|api_?key|secret|secret_key|password|passwd)$", re.I)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "OPENAI_API_KEY")


def redact(obj, found: set | None = None):
    """A copy of a config container with secrets masked: by key name, or by value equal to a secret env var. The
    masked strings are added to `found`, for the other records of the run (Hydra's)."""
    found = set() if found is None else found
    secrets = {v for k in SECRET_ENV if (v := os.environ.get(k))}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if SECRET_KEY.search(str(k)) and v:
                found.update([v] if isinstance(v, str) else [])
                out[k] = "<redacted>"
            else:
                out[k] = redact(v, found)
        return out
    if isinstance(obj, list):
        return [redact(v, found) for v in obj]
    if isinstance(obj, str) and obj in secrets:
        found.add(obj)
        return "<redacted>"
    return obj


def _redact_hydra_record(run_dir: Path, secrets: set) -> None:
    """Hydra writes the config and the command-line overrides into .hydra/ before the run starts: mask there too
    what redact masked in config.yaml."""
    for path in (run_dir / ".hydra").glob("*.yaml"):
        text = path.read_text()
        masked = text
        for secret in sorted(secrets, key=len, reverse=True):
            masked = masked.replace(secret, "<redacted>")
        if masked != text:
            path.write_text(masked)


# What lorafit writes into a run dir (beside the hook outputs, named by the config), and what of it says a run is
# there. Hydra's .hydra/ and its log are Hydra's: neither counts, and train.overwrite leaves them alone.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
RUN_FILES = (*RUN_MARKERS, "generations.jsonl", "wandb_run_id", "wandb", "analysis", "initial_adapter", "model")


def _run_files(run_dir: Path, cfgs) -> list[Path]:
    """The lorafit files in run_dir, with the hook dirs and the TensorBoard dir of the configs `cfgs` (this run's and
    the previous run's config.yaml)."""
    names = set(RUN_FILES)
    for c in cfgs:
        hooks = c.get("hooks") or {}
        names |= {h["dir"] for h in (hooks.get("save_adapter"), hooks.get("merge")) if h and h.get("dir")}
        if (c.get("logging") or {}).get("backend") == "tensorboard":
            names.add(c["logging"]["project"])
    return sorted(run_dir / n for n in names if (run_dir / n).exists() and "/" not in n and n not in ("", ".", ".."))


def _claim_run_dir(cfg, run_dir: Path, main: bool) -> None:
    """A run without train.resume gets a run dir that holds no other run: a previous run's checkpoints would be
    taken over by `train.resume=auto`, its metrics truncated, its adapter and analysis left beside the new ones.
    train.overwrite=true clears lorafit's files of it (and nothing else); the main process does the clearing."""
    from lorafit import checkpoint

    held = [n for n in RUN_MARKERS if (run_dir / n).exists()]
    t = cfg.train
    if t.resume == "auto" and "summary.json" in held and not checkpoint.complete_checkpoints(run_dir / "checkpoints"):
        raise UserError(f"train.resume=auto: {run_dir} holds a finished run and no checkpoint to continue from; "
                        "start over with train.overwrite=true instead (or pick another hydra.run.dir)")
    if t.resume is not None or not held:
        return
    if not t.overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with train.resume=auto, "
                        "replace it with train.overwrite=true, or pick another hydra.run.dir")
    if main:
        previous = run_dir / "config.yaml"
        cfgs = [OmegaConf.to_container(cfg)] + ([OmegaConf.to_container(OmegaConf.load(previous))]
                                                if previous.is_file() else [])
        for path in _run_files(run_dir, cfgs):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _sweep_group() -> str | None:
    """In a multirun, the sweep's name (e.g. bbc_news-2026-11-23_10-45-25): every job of it is one W&B group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


def _accelerator(cfg, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    from lorafit.hardware import resolve_precision

    if _asks_for("FSDP") and _asks_for("CPU") and os.environ.get("FSDP_VERSION") != "2":  # accelerate fails obscurely
        raise UserError("FSDP on CPU processes needs fsdp_version: 2 in the accelerate config "
                        "(see conf/accelerate/cpu_fsdp.yaml)")
    backend = None if cfg.logging.backend == "none" else cfg.logging.backend
    # The train loop's micro-batches cross epoch ends: only the step count decides when gradients sync.
    steps = GradientAccumulationPlugin(num_steps=cfg.train.grad_accum, sync_with_dataloader=False)
    # auto: bf16 autocast where the GPU or CPU computes bf16 natively (AVX512-BF16, AMX), fp32 elsewhere
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.train.mixed_precision), log_with=backend,
                              project_dir=str(run_dir), gradient_accumulation_plugin=steps)
    for engine in ("FSDP", "DEEPSPEED"):
        if not _asks_for(engine):
            continue
        if accelerator.distributed_type == "MULTI_CPU":
            _engine_on_cpu(accelerator, engine)
        launched = int(os.environ.get("WORLD_SIZE", 1))
        # accelerate 1.15 can fall back silently: to DDP, or (DeepSpeed without use_cpu on a CPU machine) to a state
        # that counts 1 process of 2
        if accelerator.distributed_type != engine or accelerator.num_processes != launched:
            raise UserError(f"the accelerate config asks for {engine} on {launched} processes, but accelerate set up "
                            f"{accelerator.distributed_type.value} on {accelerator.num_processes}; on CPU processes "
                            "launch with use_cpu: true and ACCELERATE_USE_CPU=1 (conf/accelerate/cpu_*.yaml)")
    if accelerator.distributed_type == "DEEPSPEED":
        _fill_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.train)
    return accelerator


def _fill_deepspeed_config(ds: dict, t) -> None:
    """The lorafit config decides what DeepSpeed's config would otherwise repeat (or leave "auto", which accelerate
    can fill only from a prepared dataloader): micro-batch size, accumulation and clipping."""
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = t.max_grad_norm if t.max_grad_norm > 0 else 0.0
    ds.pop("train_batch_size", None)  # recomputed by accelerate from the three


def _asks_for(what: str) -> bool:
    """Does the accelerate launch config ask for FSDP, DEEPSPEED or CPU (accelerate launch passes it as env vars)?"""
    return os.environ.get(f"ACCELERATE_USE_{what}", "").lower() in ("1", "true")


def _engine_on_cpu(accelerator, engine: str) -> None:
    """accelerate 1.15 sets up FSDP and DeepSpeed only on GPU-type devices, though torch's FSDP2 (`fully_shard`) and
    DeepSpeed's CPU accelerator both run on CPU processes over gloo. Promote the MULTI_CPU state (which has the right
    process count and process group) to the engine, so prepare, backward, clipping, state dicts and checkpoints go
    through accelerate's own code for it: the path fsdp.yaml and deepspeed_zero*.yaml take on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    if engine == "FSDP":
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch sets
        if accelerator.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    else:
        import deepspeed  # noqa: F401  (a clear ImportError before anything runs)

        plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision(accelerator.mixed_precision)  # DeepSpeed runs its own precision, no autocast
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins, state._mixed_precision, accelerator.native_amp = plugin, "no", False
        accelerator.deepspeed_engine_wrapped = None
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType[engine]


WANDB_ID = "wandb_run_id"  # in the run dir: a resumed run logs into the same W&B run


def _wandb_resume(run_dir: Path, resume: str | None) -> dict:
    """W&B run id and resume mode: the run dir keeps the id, so `train.resume` continues that W&B run instead of
    starting a second one. Steps the crashed run logged past its checkpoint are not logged twice: W&B keeps the
    first value of a step (on CPU the resumed run recomputes the same values bitwise)."""
    path = run_dir / WANDB_ID
    if resume is not None and path.is_file():
        return {"id": path.read_text().strip(), "resume": "allow"}
    import uuid

    run_id = uuid.uuid4().hex[:12]  # W&B's own ids are 8 lowercase alphanumerics; any such string is accepted
    path.write_text(run_id)
    return {"id": run_id}


def run(cfg, run_dir: Path | None = None) -> float:
    """Train one adapter as `cfg` says; return the primary eval metric (what a sweeper optimizes)."""
    from accelerate.utils import set_seed

    from lorafit import adapters, autorank, checkpoint, data, hooks, metrics, models, speed
    from lorafit.train import MetricsLog, forgetting_eval, split_eval, train

    t_start = time.perf_counter()
    quiet_libraries()
    validate(cfg)
    run_dir = Path(run_dir or _run_dir())
    hooks.check_output_dirs(cfg, run_dir)  # a hook dir that would replace a foreign folder: refused before training
    run_dir.mkdir(parents=True, exist_ok=True)
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The processes' state before the Accelerator below takes it over; `cpu` as AcceleratorState would pass it
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    _claim_run_dir(cfg, run_dir, processes.is_main_process)  # every process decides alike, before anything is written
    processes.wait_for_everyone()
    accelerator = _accelerator(cfg, run_dir)
    secrets = set()
    resolved = redact(OmegaConf.to_container(cfg, resolve=True), secrets)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        _redact_hydra_record(run_dir, secrets)

    tokenizer = models.build_tokenizer(cfg.model)
    splits = data.load_splits(cfg)
    train_ds, eval_ds = data.tokenize(splits, tokenizer, cfg)
    set_seed(cfg.train.seed)  # before the model: LoRA's A init is random
    model = adapters.attach_lora(models.build_model(cfg, splits.labels), cfg)
    if accelerator.is_main_process:
        adapters.save_initial_adapter(model, cfg, run_dir)
    speed.install(model, cfg.model.fast_dropout)  # after attach_lora, so LoRA's own dropout layers are swapped too
    params = adapters.parameter_report(model)
    accelerator.print(adapters.format_parameter_report(params))

    if accelerator.log_with:
        name = cfg.logging.run_name or run_dir.name
        # TensorBoard's hparams take scalars only: give it flat keys and printable values.
        tracker_config = resolved if cfg.logging.backend == "wandb" else _flat_scalars(resolved)
        wandb = {"name": name, "group": cfg.logging.group or _sweep_group(), "dir": str(run_dir)}
        if cfg.logging.backend == "wandb" and accelerator.is_main_process:
            wandb.update(_wandb_resume(run_dir, cfg.train.resume))
        accelerator.init_trackers(cfg.logging.project, config=tracker_config, init_kwargs={"wandb": wandb})
    extra_evals = []
    if cfg.eval.generate:
        from lorafit.generate import generation_eval

        extra_evals.append(generation_eval(data.generation_rows(splits.eval, cfg), tokenizer, cfg, accelerator, run_dir))
    for name in splits.more_eval:  # scored as the eval split is, its metrics prefixed: eval/mismatched_accuracy
        extra_evals.append(split_eval(name, *data.tokenize(splits, tokenizer, cfg, [name]), tokenizer.pad_token_id, cfg,
                                      accelerator))
    if cfg.eval.forgetting_file:
        extra_evals.append(forgetting_eval(data.general_text(cfg, tokenizer), tokenizer.pad_token_id, cfg, accelerator))
    sharded = accelerator.distributed_type in checkpoint.SHARDED
    with speed.frozen_weights_in(model, accelerator.mixed_precision, sharded):
        result = train(model, tokenizer, train_ds, eval_ds, cfg, accelerator, run_dir,
                       MetricsLog(run_dir / "metrics.jsonl", accelerator), extra_evals)

    metric = metrics.primary_metric(cfg)
    summary = {
        "run_dir": str(run_dir), "model": cfg.model.name, "task": cfg.model.task, "method": cfg.lora.method, "objective": cfg.objective.name,
        "lora_r": cfg.lora.r if cfg.lora.method == "lora" else None, "seed": cfg.train.seed,
        "primary_metric": metric, "eval": result.eval, "steps": result.steps, "train_loss": result.train_loss,
        "trainable_params": params["trainable"], "total_params": params["total"],
        "trainable_percent": params["percent"], "train_wall_s": result.wall_s,
        "eval_wall_s": result.eval_s,  # throughput below is over training steps only, evaluation left out
        **({"rollout_wall_s": result.rollout_s, "rollout_share": result.rollout_s / max(result.wall_s - result.eval_s, 1e-9)}
           if cfg.objective.name == "grpo" else {}),  # RL: how much of training was generating and scoring
        "samples_per_s": result.samples / (result.wall_s - result.eval_s) if result.wall_s > result.eval_s else None,
        "tokens_per_s": result.tokens / (result.wall_s - result.eval_s) if result.wall_s > result.eval_s else None,
        "best_step": result.best_step, "adapter_step": result.best_step if cfg.train.save_best else result.steps,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps, "overflow_steps": result.overflow_steps,
        "processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.value, "auto_rank": result.auto_rank, "peak_memory": _peak_memory(accelerator),
        "precision": PRECISION_NAMES[accelerator.mixed_precision], **_utilization(result, accelerator),
    }
    trained = _model_for_hooks(model, cfg, splits.labels, accelerator)
    if accelerator.is_main_process and result.auto_rank:  # lora.r=auto: the hooks see the small adapter that ships
        autorank.cut(trained, result.auto_rank["ranks"], cfg.lora.use_rslora)
        summary["trainable_params_while_training"] = params["trainable"]
        params = adapters.parameter_report(trained)
        summary.update(trainable_params=params["trainable"], trainable_percent=params["percent"])
    if accelerator.is_main_process:
        adapters.drop_reference(trained)  # lora.init_from's frozen reference: the hooks see the trained adapter alone
        probe = data.collate([eval_ds[i] for i in range(min(8, len(eval_ds)))], tokenizer.pad_token_id)
        probe = {k: v for k, v in probe.items() if k in ("input_ids", "attention_mask", "token_type_ids")}  # model inputs only
        ctx = hooks.RunContext(cfg, trained, tokenizer, run_dir, accelerator, summary, probe, splits.labels)
        hooks.run_hooks(ctx)
        summary["wall_s"] = time.perf_counter() - t_start
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        _print_summary(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result.eval.get(metric, float("nan"))


def _model_for_hooks(model, cfg, labels, accelerator):
    """The trained model as the hooks, on the main process alone, see it. A sharded model (FSDP, DeepSpeed ZeRO-3)
    needs every process for a forward or a state dict, and DeepSpeed's module may hold bf16 copies of the fp32
    weights: every process takes part in gathering the trained weights, and the main process puts them into an
    unsharded copy built from the config (the frozen base is the config's, unchanged by training). Returns None on
    the other processes."""
    from lorafit import adapters, checkpoint, models

    if accelerator.distributed_type not in checkpoint.SHARDED:
        return accelerator.unwrap_model(model)

    state = checkpoint.trainable_state(accelerator, model)
    if not accelerator.is_main_process:
        return None
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else from_pretrained partitions the copy with ZeRO-3 (a collective: it hangs)
    copy = adapters.attach_lora(models.build_model(cfg, labels), cfg)
    missing = {n for n, p in copy.named_parameters() if p.requires_grad} - state.keys()
    if missing:
        raise RuntimeError(f"the gathered state lacks trained weights: {sorted(missing)[:3]}")
    copy.load_state_dict(state, strict=False)
    return copy.eval()


PRECISION_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's mixed_precision -> what ran


def _peak_memory(accelerator) -> dict:
    """Peak memory of this process: the GPU's allocator peak on CUDA, and the resident set size (RSS) in any case."""
    import resource
    import sys

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    gpu = torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else None
    return {"rss_bytes": rss, "gpu_bytes": gpu}


def _utilization(result, accelerator) -> dict:
    """Model FLOP/s over the training steps, and MFU: that rate over this machine's measured matmul peak (per
    process, times the processes) in the precision that ran."""
    from lorafit.hardware import peak_matmul_flops

    train_s = result.wall_s - result.eval_s
    if train_s <= 0 or not result.flops:
        return {"model_flops_per_s": None, "peak_flops_per_s": None, "mfu": None}
    rate, peak = result.flops / train_s, peak_matmul_flops(accelerator.mixed_precision) * accelerator.num_processes
    return {"model_flops_per_s": rate, "peak_flops_per_s": peak, "mfu": rate / peak}


def _print_summary(s: dict) -> None:
    lines = [
        "",
        f"done: {s['steps']} steps in {s['train_wall_s']:.1f}s ({s['samples_per_s']:.1f} samples/s training, "
        f"{s['eval_wall_s']:.1f}s of it evaluating)",
        f"  precision {s['precision']}" + (f", {s['model_flops_per_s'] / 1e9:.0f} model GFLOP/s = MFU {s['mfu']:.0%} of "
                                           f"this machine's measured {s['precision']} matmul peak" if s["mfu"] else ""),
        f"  eval {s['primary_metric']}: {s['eval'].get(s['primary_metric'], float('nan')):.4f}   "
        + "  ".join(f"{k}={v:.4f}" for k, v in s["eval"].items() if k not in (s["primary_metric"], "n"))
        + f"  (n={s['eval'].get('n')})",
        f"  trainable params: {s['trainable_params']:,} ({s['trainable_percent']:.3f}%)",
    ]
    if a := s.get("auto_rank"):
        lines.append(f"  lora.r=auto: r={a['r_max']} until step {a['step']}, then ranks {min(a['ranks'].values())}-"
                     f"{max(a['ranks'].values())} ({a['params_before']:,} -> {a['params_after']:,} LoRA parameters, "
                     f"{a['energy_kept']:.1%} of ΔW's energy kept at the shrink)")
    if "spectrum" in s:
        lines.append(f"  ΔW: mean effective rank {s['spectrum']['mean_effective_rank']:.2f}, mean r90 "
                     f"{s['spectrum']['mean_r90']:.1f} over {s['spectrum']['modules']} modules (analysis/)")
    if "merge" in s:
        lines.append(f"  merged/: max |logit diff| merged vs unmerged = {s['merge']['max_abs_diff_merged_vs_unmerged']:.2e}")
    lines.append(f"  run dir: {s['run_dir']}")
    print("\n".join(lines), flush=True)
