"""Model FLOPs of training steps, counted from the shapes that really ran (for MFU).

Per Linear call on a (tokens × d_in) input, 2·tokens·d_in·d_out each for: the forward; the backward to the input,
when the input needs a gradient (not below the lowest trainable layer); the weight gradient, when the weight
trains (LoRA's A and B, a classifier head; frozen base weights get none). Counted by forward hooks, so the pooler
and classifier count one token per row and an LM head only the positions that reach it. Attention's two matmuls
(QKᵀ and AV, 4·L²·d per row and layer forward, twice that backward) are not Linear calls: they are added from the
config at the batch's padded length L, which is what the kernels compute.
"""

from __future__ import annotations

import torch
from torch import nn


class FlopCounter:
    """Counts the FLOPs of `model`'s passes that run with gradients on (training; evaluation runs under no_grad)."""

    def __init__(self, model):
        self.total = 0
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", 0) or 0
        head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
        self.layers, self.attn_dim = getattr(config, "num_hidden_layers", 0) or 0, heads * head_dim
        self._handles = [m.register_forward_hook(self._linear) for m in model.modules() if isinstance(m, nn.Linear)]

    def _linear(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            return
        x = args[0]
        per_pass = 2 * (x.numel() // x.shape[-1]) * module.in_features * module.out_features
        self.total += per_pass * (1 + x.requires_grad + module.weight.requires_grad)

    def attention(self, batch: dict) -> None:
        """Add the attention matmuls of one training micro-batch (forward and backward) at its padded length. A
        packed row counts whole too: sdpa computes it with a block-diagonal mask (flash-attention varlen would not)."""
        rows, length = batch["input_ids"].shape
        self.total += 3 * 4 * rows * length**2 * self.attn_dim * self.layers

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
