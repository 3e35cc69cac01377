"""What a saved adapter needs to be rebuilt outside its run: the run's model and quant config, and a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from lorafit.adapters import RUN_INFO
from lorafit.errors import UserError
from lorafit.models import build_tokenizer, load_config


def base_name(adapter_dir: Path, config: dict, base: str | None) -> str:
    """The base to put an adapter on: `base` (--base) if given, else the adapter's base_model_name_or_path."""
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}: adapter_config.json names no base model; pass --base")
    return base


def run_config(adapter_dir: Path, state: dict, config: dict, base: str) -> tuple:
    """(config, info) of the run that trained this adapter: its model and quant config on `base`, and info's task
    and labels (best guesses for foreign adapters: the task from peft's task_type, or else the base's architecture)."""
    from lorafit.config import Config

    info = _run_info(adapter_dir, state, config, base)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {"model": {**info["model"], "name": base, "task": info["task"]},
                                                          "quant": info["quant"]})
    return cfg, info


def _run_info(adapter_dir: Path, state: dict, config: dict, base: str) -> dict:
    path = adapter_dir / RUN_INFO
    if path.is_file():
        info = json.loads(path.read_text())
        if not isinstance(info.get("model"), dict):  # written before lorafit recorded the configs in full
            info.update(model={}, quant={"mode": info.get("quant", "none")})
        return info
    task = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm"}.get(config.get("task_type"))
    if task is None and config.get("task_type") is None:
        from lorafit.config import ModelConfig

        arch = " ".join(load_config(OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": base})).architectures or [])
        task = "causal_lm" if "ForCausalLM" in arch else "seq_cls" if "ForSequenceClassification" in arch else None
    if task is None:
        raise UserError(f"{adapter_dir}: adapter task_type {config.get('task_type')!r} is not SEQ_CLS or CAUSAL_LM, "
                        "and the base's architecture does not say which")
    head = [v for k, v in state.items() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
    labels = [f"LABEL_{i}" for i in range(head[-1].shape[0])] if task == "seq_cls" and head else None
    return {"task": task, "labels": labels, "model": {}, "quant": {"mode": "none"}}


def saved_tokenizer(cfg_model, adapter_dir: Path):
    """The tokenizer saved beside the adapter (lorafit does that), else the base's, else None: a merge needs
    weights, not a tokenizer, and many bases are saved with `save_pretrained` alone."""
    for path in ([adapter_dir] if (adapter_dir / "tokenizer_config.json").is_file() else []) + [None]:
        try:
            return build_tokenizer(cfg_model, path)
        except (UserError, OSError, ValueError, TypeError):
            continue
    return None
