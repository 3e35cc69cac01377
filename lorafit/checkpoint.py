"""Checkpoints: accelerate's save_state / load_state, made atomic and adapter-sized.

A checkpoint is `checkpoints/step_N/`: the trainable weights (safetensors), optimizer and every process's RNG
states (python, numpy, torch, cuda) through accelerate, plus `trainer_state.json`: the step, the scheduler's state,
the losses since the last log, the best evaluation, and the run's fingerprint (the config keys that decide the
trajectory), which a resume must match. The data position needs no file: the sample order is a pure function of
(seed, epoch), so the step says where to continue. It is written to a hidden temp dir and renamed into place, so a
crash mid-save leaves the previous checkpoint valid and `resume=auto` never sees a half-written one.

Loading runs no code from the checkpoint: every pickled file in it must load with `torch.load(weights_only=True)`
(tensors, numbers, numpy RNG arrays) before accelerate or DeepSpeed opens it, and the scheduler state is JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.errors import UserError

STATE_FILE = "trainer_state.json"


PREEMPTED_EXIT = 75  # exit code after a SIGTERM / SIGUSR1 checkpoint: sysexits' EX_TEMPFAIL, "try again" (requeue)


def crash_point(point: str, step: int) -> None:
    """Fault injection for the crash tests: LORAFIT_FAULT=save:N (mid-save) or step:N SIGKILLs this process there;
    term:N sends it SIGTERM after step N (term:N:R only on the process of rank R), as a scheduler's preemption does."""
    fault = os.environ.get("LORAFIT_FAULT", "")
    if fault == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "step" and fault.split(":")[:2] == ["term", str(step)] and \
            fault.split(":")[2:] in ([], [os.environ.get("RANK", "0")]):
        os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
    """SIGTERM / SIGUSR1 (how SLURM and cloud schedulers stop a job, some time before they kill it) ask for a
    checkpoint at the next step boundary instead of killing the process. The signal may reach one process only, so
    `requested` is agreed by every process at every step: one 0-d all-reduce."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._note)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _note(self, signum, frame):
        self.signum = signum

    def requested(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return bool(self.signum)
        import torch

        flag = torch.tensor(int(self.signum > 0), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)


def keep_only_trainable(accelerator, model) -> None:
    """Make save_state write only trainable tensors: a LoRA checkpoint is megabytes, not the whole base model.
    (DeepSpeed's engine writes its model itself: `save` tells it to leave the base out. FSDP's sharded checkpoint
    holds the base's shards too: accelerate 1.15's save_state has no adapter-only switch.)"""
    trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def drop_frozen(models, weights, output_dir):
        for w in weights:
            for key in [k for k in w if k not in trainable]:
                del w[key]

    accelerator.register_save_state_pre_hook(drop_frozen)


@dataclass
class Best:
    """The best evaluation so far (train.save_best, train.early_stopping_patience); kept in every checkpoint's
    trainer_state.json, so a resumed run goes on comparing against what the crashed run had seen."""

    metric: str
    higher_is_better: bool
    value: float | None = None
    step: int | None = None
    eval: dict = field(default_factory=dict)
    evals_since: int = 0  # evaluations without improvement since the best

    def update(self, step: int, evaluation: dict) -> bool:
        """Record `evaluation` at `step`; True when it is a new best (strictly better)."""
        value = evaluation[self.metric]
        if self.value is not None and not (value > self.value if self.higher_is_better else value < self.value):
            self.evals_since += 1
            return False
        self.value, self.step, self.eval, self.evals_since = value, step, dict(evaluation), 0
        return True


BEST_WEIGHTS = "best.safetensors"  # checkpoints/best.safetensors: the trainable weights at Best.step


SHARDED = ("FSDP", "DEEPSPEED")  # engines whose processes each hold part of the model (or of its fp32 weights)


def trainable_state(accelerator, model) -> dict:
    """The trainable weights as whole fp32 CPU tensors, on the main process (only there when sharded). Under FSDP and
    DeepSpeed every process holds a shard of them, or DeepSpeed's fp32 master copies, so every process must call
    this: torch's state-dict API, or DeepSpeed's, gathers them."""
    if accelerator.distributed_type == "DEEPSPEED":
        from deepspeed.utils import safe_get_full_fp32_param

        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        return {n: safe_get_full_fp32_param(p).cpu() for n, p in named}  # ZeRO-2's module may hold bf16 copies
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = accelerator.unwrap_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    # torch 2.13 keeps a frozen tied weight (a tied LM head) under its second name: filter by name too
    return {k: v for k, v in get_model_state_dict(model, options=options).items() if k in trainable}


def load_trainable(accelerator, model, state: dict) -> None:
    """Put whole trainable weights (trainable_state's) into `model`, sharding them where it is sharded; every process
    passes the same `state`."""
    model = accelerator.unwrap_model(model)
    if accelerator.distributed_type == "DEEPSPEED":  # into the fp32 masters, which trainable_state reads
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in model.named_parameters():
            if n in state:
                safe_set_full_fp32_param(p, state[n])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):  # the root and the LM head stay gathered after an eval forward
            module.reshard()
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save_best(accelerator, model, run_dir: Path, step: int) -> None:
    """The trainable weights of `model` now, written atomically with their step (main process)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trainable_state(accelerator, model).items()}
    if accelerator.is_main_process:
        path = Path(run_dir) / "checkpoints" / BEST_WEIGHTS
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, path.with_name(".tmp_" + BEST_WEIGHTS), metadata={"step": str(step)})
        os.replace(path.with_name(".tmp_" + BEST_WEIGHTS), path)
    accelerator.wait_for_everyone()


def load_best(accelerator, model, run_dir: Path, step: int) -> None:
    """Put the weights of the best evaluation (step `step`) back into `model`."""
    from safetensors import safe_open

    path = Path(run_dir) / "checkpoints" / BEST_WEIGHTS
    with safe_open(path, "pt") as f:
        if f.metadata().get("step") != str(step):
            raise UserError(f"{path} holds step {f.metadata().get('step')}, not the best step {step}: it was "
                            "overwritten by another run in this dir; start over without train.resume")
        state = {k: f.get_tensor(k) for k in f.keys()}
    load_trainable(accelerator, model, state)


def save(accelerator, run_dir: Path, step: int, keep: int, extra: dict | None = None,
         rollout: dict | None = None) -> Path:
    """A checkpoint of the step: accelerate's state (trainable weights, optimizer, RNG per process), `extra` in
    trainer_state.json, and `rollout`, this process's RL rollout when the step falls inside its updates."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type == "DEEPSPEED"  # its engine writes the model: tell it to skip the base
    accelerator.save_state(str(tmp), safe_serialization=True, **({"exclude_frozen_parameters": True} if deepspeed else {}))
    if rollout is not None:
        from safetensors.torch import save_file

        save_file(rollout, tmp / f"rollout_{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()  # every process has written its RNG states into tmp before it is renamed
    crash_point("save", step)  # the state is on disk, but not yet marked complete nor renamed
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "processes": accelerator.num_processes, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# train keys that change what happens beside the steps, not the steps: a resume may change them
NOT_TRAJECTORY = ("eval_batch_size", "eval_every", "eval_on_start", "save_best", "early_stopping_patience", "save_every",
                  "keep_checkpoints", "log_every", "resume", "overwrite", "on_nonfinite")


def load_rollout(path: Path, accelerator) -> dict:
    """This process's rollout saved in the checkpoint at `path` (see save)."""
    from safetensors.torch import load_file

    file = Path(path) / f"rollout_{accelerator.process_index}.safetensors"
    if not file.is_file():
        raise UserError(f"checkpoint {path} stopped inside a rollout's objective.iterations updates but lacks "
                        f"{file.name}: resume from another checkpoint, or start over")
    return load_file(file)


def fingerprint(cfg) -> dict:
    """What decides the training trajectory, as dotted key -> value: the model, data, lora and quant sections and the
    train keys but NOT_TRAJECTORY (max_steps and epochs count: they set the learning-rate schedule)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tree = {k: tree[k] for k in ("model", "data", "lora", "quant", "train")}
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in NOT_TRAJECTORY}

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return json.loads(json.dumps(flat(tree)))  # as trainer_state.json gives it back (lists, not tuples)


def check_fingerprint(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to resume `path` with settings that change the trajectory, naming every differing key."""
    if saved is None:
        raise UserError(f"checkpoint {path} has no run fingerprint (an older lorafit wrote it), so it can't be "
                        "checked against this run: start over without train.resume")
    differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k, "<unset>") != now.get(k, "<unset>"))
    if differ:
        said = "; ".join(f"{k}={saved.get(k, '<unset>')} there, {now.get(k, '<unset>')} now" for k in differ)
        raise UserError(f"checkpoint {path} is of a run with other settings ({said}): resume with the checkpoint's "
                        "settings, or start over with train.overwrite=true (or another hydra.run.dir)")


def check_pickles(path: Path) -> None:
    """Every pickled file of a checkpoint must load as plain data (tensors, numbers, containers, numpy RNG arrays):
    accelerate loads some with weights_only=False, DeepSpeed all, and a planted or tampered one would run code."""
    import pickle
    import zipfile

    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # what accelerate's RNG states need

    allowed = list(TORCH_SAFE_GLOBALS)
    if any(path.rglob("*_optim_states.pt")):  # DeepSpeed's optimizer state records these two objects
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [LossScaler, ZeroStageEnum]
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".pkl", ".bin", ".pt", ".pth")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise UserError(f"checkpoint file {f} holds something other than plain tensors and numbers, or is "
                            f"corrupt ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); lorafit loads no "
                            "such file: remove the checkpoint and resume from another one, or start over") from None


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under root, oldest first (temp dirs and ones without a state file are skipped)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint train.resume points at: None (fresh start), `auto` (newest complete, if any) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE}); "
                        "use train.resume=auto or a checkpoints/step_N dir")
    return path


def load(accelerator, path: Path, scheduler, fingerprint_now: dict) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the trainer state (the step to continue from,
    and what save's `extra` held)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file {path / STATE_FILE} is corrupt ({e}): resume from another checkpoint, or "
                        "start over") from None
    if state.get("processes", 1) != accelerator.num_processes:  # per-process RNG files and data shards differ
        raise UserError(f"checkpoint {path} was written by {state['processes']} processes and this run has "
                        f"{accelerator.num_processes}; resume with the same count (accelerate launch --num_processes "
                        f"{state['processes']}), or start fresh without train.resume")
    check_fingerprint(path, state.get("fingerprint"), fingerprint_now)
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():  # accelerate would go on without it, silently on other random numbers
        raise UserError(f"checkpoint {path} lacks {rng.name}: resume from another checkpoint, or start over")
    check_pickles(path)
    try:
        # the frozen base was never saved: not strict (DeepSpeed's engine names the flag its own way)
        accelerator.load_state(str(path), **({"load_module_strict": False} if accelerator.distributed_type == "DEEPSPEED"
                                             else {"strict": False}))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "was it written with another model, lora config or process count?") from None
    scheduler.load_state_dict(state["scheduler"])
    return state
