"""What a saved adapter needs to be rebuilt outside its run: the run's model and quant config, and a tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lorafit.adapters import RUN_INFO
from lorafit.errors import UserError
from lorafit.models import build_tokenizer, load_config


def base_name(adapter_dir: Path, config: dict, base: str | None) -> str:
    """The base to put an adapter on: `base` (--base) if given, else the model.name its run was given (lorafit.json:
    an alias or a hub id still holds once LORAFIT_CACHE or the venv moves, unlike the absolute path peft saved),
    else the adapter's base_model_name_or_path; the first of those that is still there."""
    if base:
        return base
    names = list(dict.fromkeys(n for n in (_run_model_name(adapter_dir), config.get("base_model_name_or_path")) if n))
    if not names:
        raise UserError(f"{adapter_dir}: adapter_config.json names no base model; pass --base MODEL")
    found = next((n for n in names if _still_there(n)), None)
    if found is None:
        raise UserError(f"{adapter_dir}: its base {' / '.join(map(repr, names))} is no longer there (a moved cache, venv "
                        "or model dir?); pass --base MODEL (an alias, a local model dir or a hub id)")
    return found


def _run_model_name(adapter_dir: Path) -> str | None:
    model = (saved_run_info(adapter_dir) or {}).get("model")
    return model.get("name") if isinstance(model, dict) else None


def saved_run_info(adapter_dir: Path) -> dict | None:
    """lorafit.json beside a saved adapter (or a lora=full model), None where there is none (a foreign adapter)."""
    path = adapter_dir / RUN_INFO
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: corrupt JSON ({e.msg}); remove it to load the adapter as a foreign one") from None


def _still_there(name: str) -> bool:
    """What models.resolve accepts without looking further: an alias or hub id, or a path to a model dir."""
    path = Path(name).expanduser()
    return (path / "config.json").is_file() if path.exists() or name.startswith((".", "/", "~")) else True


def run_config(adapter_dir: Path, state: dict, config: dict, base: str, trust_remote_code: bool = False) -> tuple:
    """(config, info) of the run that trained this adapter: its model and quant config on `base`, and info's task,
    labels and data settings (best guesses for foreign adapters: the task from peft's task_type, or else the base's
    architecture). The base's own Python code runs only when *this* command asks (`trust_remote_code`): a saved
    lorafit.json is a downloaded file like any other, so its model.trust_remote_code is never taken over."""
    from lorafit.config import Config

    info = _run_info(adapter_dir, state, config, base, trust_remote_code)
    if info["model"].get("trust_remote_code") and not trust_remote_code:
        print(f"lorafit: note: {adapter_dir} was trained with model.trust_remote_code=true; {base}'s own code runs "
              "only if you pass --trust-remote-code (do so only if you trust it)", file=sys.stderr)
    model = {**info["model"], "name": base, "task": info["task"], "trust_remote_code": trust_remote_code}
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": model, "quant": info["quant"]})
    return cfg, info


def _run_info(adapter_dir: Path, state: dict, config: dict, base: str, trust_remote_code: bool) -> dict:
    info = saved_run_info(adapter_dir)
    if info is not None:
        if not isinstance(info.get("model"), dict):  # written before lorafit recorded the configs in full
            info.update(model={}, quant={"mode": info.get("quant", "none")})
        return info
    task = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm"}.get(config.get("task_type"))
    if task is None and config.get("task_type") is None:
        from lorafit.config import ModelConfig

        cfg_model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": base, "trust_remote_code": trust_remote_code})
        arch = " ".join(load_config(cfg_model).architectures or [])
        task = "causal_lm" if "ForCausalLM" in arch else "seq_cls" if "ForSequenceClassification" in arch else None
    if task is None:
        raise UserError(f"{adapter_dir}: adapter task_type {config.get('task_type')!r} is not SEQ_CLS or CAUSAL_LM, "
                        "and the base's architecture does not say which")
    head = [v for k, v in state.items() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
    labels = [f"LABEL_{i}" for i in range(head[-1].shape[0])] if task == "seq_cls" and head else None
    return {"task": task, "labels": labels, "model": {}, "quant": {"mode": "none"}}


def attach(base_model, adapter_dirs: list[Path], base: str, names: list[str] | None = None):
    """The adapters on `base_model` through peft (each under its name in `names`, the first one active; peft's
    "default" for a single unnamed one), or one line naming the adapter that was trained on another base."""
    from peft import PeftModel

    names = names or ["default"] * len(adapter_dirs)
    model = None
    for d, name in zip(adapter_dirs, names):
        try:
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(d), adapter_name=name)
            else:
                model.load_adapter(str(d), adapter_name=name)
        except (RuntimeError, ValueError) as e:  # size mismatch, or no module of this base is the adapter's target
            raise UserError(f"adapter {d} does not fit base {base!r}: {str(e).strip().splitlines()[-1][:200]}; "
                            "pass the base it was trained on with --base") from None
    return model


def saved_tokenizer(cfg_model, adapter_dir: Path):
    """The tokenizer saved beside the adapter (lorafit does that), else the base's, else None: a merge needs
    weights, not a tokenizer, and many bases are saved with `save_pretrained` alone."""
    for path in ([adapter_dir] if (adapter_dir / "tokenizer_config.json").is_file() else []) + [None]:
        try:
            return build_tokenizer(cfg_model, path)
        except (UserError, OSError, ValueError, TypeError):
            continue
    return None
