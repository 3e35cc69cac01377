"""Attach LoRA to a base model through peft, and report what is trainable."""

from __future__ import annotations

import logging
from collections import defaultdict

from omegaconf import OmegaConf

from lorafit.models import HEAD_NAMES

log = logging.getLogger(__name__)

PEFT_INIT = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}


def peft_config(cfg):
    from peft import LoraConfig, TaskType

    lo = cfg.lora
    target = lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules)
    return LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=target,
        # SEQ_CLS makes peft train and save the classifier head (`classifier` / `score`) as modules_to_save.
        task_type=TaskType.SEQ_CLS if cfg.model.task == "seq_cls" else TaskType.CAUSAL_LM,
        modules_to_save=list(lo.modules_to_save) if lo.modules_to_save else None,
        use_rslora=lo.use_rslora, use_dora=lo.use_dora, init_lora_weights=PEFT_INIT[lo.init],
        rank_pattern=OmegaConf.to_container(lo.rank_pattern) if lo.rank_pattern else {},
        alpha_pattern=OmegaConf.to_container(lo.alpha_pattern) if lo.alpha_pattern else {},
    )


def attach_lora(model, cfg):
    """The model with LoRA attached through peft; with lora.method=full, the model itself, every weight trainable."""
    if cfg.lora.method == "full":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(cfg))


def parameter_report(model) -> dict:
    """Trainable parameters in total and per module type (query, value, classifier, ...)."""
    total = trainable = 0
    by_type: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # 4-bit packs two weights per byte
        total += n
        if p.requires_grad:
            trainable += n
            parts = name.split(".")
            if "lora_A" in parts or "lora_B" in parts or "lora_magnitude_vector" in parts:
                key = parts[max(i for i, s in enumerate(parts) if s.startswith("lora_")) - 1]
            else:
                key = next((h for h in HEAD_NAMES if h in parts), "other")
            by_type[key] += n
    return {"total": total, "trainable": trainable, "percent": 100.0 * trainable / max(total, 1),
            "by_module_type": dict(sorted(by_type.items()))}


def format_parameter_report(rep: dict) -> str:
    lines = [f"trainable params: {rep['trainable']:,} of {rep['total']:,} ({rep['percent']:.3f}%)"]
    lines += [f"  {k:<24s}{v:>12,}" for k, v in rep["by_module_type"].items()]
    return "\n".join(lines)
