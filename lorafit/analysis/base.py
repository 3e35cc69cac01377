"""Where W0 comes from for the base-aware metrics: a callable `name -> W0 (d_out × d_in) or None`.

From a checkpoint dir the tensors are read one at a time with safetensors' lazy `safe_open`, so a 7B base is
never loaded whole; from the in-memory model (the post-training hook) they are the frozen base layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from lorafit.errors import UserError

BaseWeights = Callable[[str], "torch.Tensor | None"]


def from_dir(model: str, fan_in_fan_out: bool = False) -> BaseWeights:
    from safetensors import safe_open

    from lorafit.models import resolve

    root = Path(resolve(model))
    if not root.is_dir():  # a hub id: only the safetensors and json files are fetched
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:
            raise UserError(f"--base {model!r} could not be fetched ({type(e).__name__}); pass a local model dir") from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        where = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise UserError(f"--base {model!r}: no .safetensors weights in {root}")
        where = {}
        for f in files:
            with safe_open(f, "pt") as h:
                where.update({k: f for k in h.keys()})

    def tensor(key: str):
        with safe_open(where[key], "pt") as h:
            return h.get_tensor(key)

    def lookup(name: str):
        name, expert = _expert(name)
        if expert is not None:  # checkpoints keep the experts apart (transformers 5 fuses them on load, splits on save)
            container, fused = name.rsplit(".", 1)
            parts = [_match(f"{container}.{expert}.{p}", where) for p in UNFUSED.get(fused, [fused])]
            return torch.cat([tensor(k) for k in parts]) if None not in parts else None
        key = _match(name, where)
        if key is None:
            return None
        W = tensor(key)
        return W.T if fan_in_fan_out else W

    return lookup


UNFUSED = {"gate_up_proj": ["gate_proj", "up_proj"]}  # a fused expert tensor: its checkpoint rows, in order


def _expert(name: str) -> tuple[str, int | None]:
    """`...mlp.experts.gate_up_proj.expert3` (spectrum.expert_factors) -> (`...mlp.experts.gate_up_proj`, 3): the
    expert's W0 is that slice of the 3-D tensor, in the orientation peft's ΔW has."""
    head, _, tail = name.rpartition(".")
    return (head, int(tail[6:])) if tail.startswith("expert") and tail[6:].isdigit() else (name, None)


def _match(name: str, keys, tensor: str = "weight") -> str | None:
    """The checkpoint key of module `name`'s `tensor` (weight or bias): the longest unique suffix match.

    Adapter names carry the task model's prefix (`bert.encoder...` in BertForSequenceClassification) that a
    headless checkpoint lacks (`encoder...`), so match on the tail of the path.
    """
    parts = name.split(".")
    for i in range(len(parts)):
        suffix = ".".join(parts[i:]) + "." + tensor
        hits = [k for k in keys if k == suffix or k.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def from_model(peft_model, fan_in_fan_out: bool = False) -> BaseWeights:
    """W0 of each adapted layer of an in-memory PeftModel (None where it is quantized)."""

    def lookup(name: str):
        name, expert = _expert(name)
        container, tensor = name.rsplit(".", 1) if expert is not None else (name, "weight")
        try:
            layer = peft_model.base_model.model.get_submodule(container)
        except AttributeError:
            return None
        while expert is not None and hasattr(layer, "base_layer"):  # peft nests one wrapper per adapted tensor
            layer = layer.base_layer
        W = getattr(getattr(layer, "base_layer", layer), tensor, None)
        W = W[expert] if W is not None and expert is not None else W
        if W is None or W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return None  # a 4-/8-bit weight: analyze with --base on the float checkpoint instead
        W = W.detach().float().cpu()
        return W.T if fan_in_fan_out else W

    return lookup
