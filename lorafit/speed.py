"""Speed-ups lorafit applies to the model, each measured on 2 CPU cores; each is exact, more precise than what it
replaces, or switchable.

1. Dropout with cheaper random numbers on CPU (`model.fast_dropout`): the same layers, the same probability, ~5x
   cheaper masks. torch's CPU dropout draws its masks with `bernoulli_`, one Mersenne-Twister float per element; on
   2 cores that was 26% of a MiniLM LoRA step with dropout 0.1, as much as all the backward matmuls. Here one 64-bit
   draw from the same generator gives four 16-bit uniforms, each compared with p rounded to 1/65536 (|error| <
   8e-6), and kept values are scaled by 1/(1 - that p), so the mask is still unbiased. Seeding, checkpointed RNG
   state and bitwise resume work as before; the masks differ from torch's, so `model.fast_dropout=false` reproduces
   a plain-torch run's masks exactly.
2. Attention that will be differentiated runs in fp32 on a CPU under bf16 autocast. torch's CPU flash-attention
   backward is slow in bf16: a MiniLM layer's (16, 12, 128, 32) attention took 32.8 ms forward+backward in bf16
   against 9.1 ms in fp32 (on SmolLM2's (4, 9, 378, 64), 17.7 vs 18.7 ms). Its inputs are upcast exactly, it
   accumulates in fp32 either way, and only its output is rounded back to bf16. Forward only (evaluation,
   generation), the bf16 kernel is as fast or faster (8.5 vs 19.2 ms at (8, 9, 512, 64)), so it keeps it.
3. Frozen Linear weights held in the autocast dtype while training (`frozen_weights_in`). Under autocast every
   frozen fp32 weight is cast to bf16 again at every forward (autocast caches casts of trainable leaves only): 14%
   of a MiniLM bf16 step. Casting them once gives the same bits to every matmul, so the run is unchanged; the fp32
   originals come back when training ends, for the hooks.

`install(model)` swaps every nn.Dropout for FastDropout (with fast_dropout) and routes sdpa attention through
`attention` below. On GPU, and on CPU in fp32 or where no backward runs through it, that defers to torch's sdpa.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "lorafit_sdpa"  # the attention implementations registered with transformers: with fast dropout masks,
ATTENTION_TORCH_DROPOUT = "lorafit_sdpa_torch_dropout"  # and with torch's own (model.fast_dropout=false)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0 or not x.is_cpu:
        return F.dropout(x, p, training)
    threshold = round(p * 65536)
    if threshold >= 65536:
        return torch.zeros_like(x)
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits, torch's own generator
    uniform16 = draws.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    # The mask straight into x's dtype, then scaled: a bool mask would be converted again in forward and backward.
    mask = torch.ge(uniform16, threshold - 32768, out=torch.empty_like(x))
    return x * mask.mul_(65536 / (65536 - threshold))


class FastDropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              fast_masks: bool = True, **kwargs):
    """transformers' sdpa attention, except on CPU: training-time dropout uses fast_dropout's masks, and bf16/fp16
    attention that will be differentiated runs torch's flash kernel in fp32 (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    args = (module, query, key, value, attention_mask)
    if fast_masks and module.training and dropout > 0 and query.is_cpu:
        return _fast_mask_attention(*args, dropout, scaling, is_causal)
    autocast = query.is_cpu and torch.is_autocast_enabled("cpu")
    low = autocast or (query.is_cpu and query.dtype in (torch.bfloat16, torch.float16))
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if not (low and backward):  # forward only, bf16's kernel is the faster one (up to 2.3x at length 512)
        return sdpa_attention_forward(*args, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    # q and k may already be fp32 here (RoPE with fp32 cos/sin), v not: all go up, and the output comes back in the
    # dtype sdpa would have returned
    dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast them back
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    return out.to(dtype), weights


def _fast_mask_attention(module, query, key, value, attention_mask, dropout: float, scaling, is_causal):
    """torch's sdpa falls back to its math path whenever dropout_p > 0 on CPU; this is that math path, with
    fast_dropout's masks on the attention probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv

    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves n_rep query heads
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif is_causal and query.shape[2] > 1:
        future = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = fast_dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def install(model: nn.Module, fast_dropout: bool = True) -> nn.Module:
    """Route sdpa attention through `attention` throughout `model` (in place), and with fast_dropout use FastDropout
    for every nn.Dropout; returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if fast_dropout:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Dropout:
                    setattr(parent, name, FastDropout(child.p, child.inplace))
    name = ATTENTION if fast_dropout else ATTENTION_TORCH_DROPOUT
    AttentionInterface.register(name, partial(attention, fast_masks=fast_dropout))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # same masks as sdpa
    for m in model.modules():  # every sub-config (e.g. a VLM's text part) that runs sdpa
        config = getattr(m, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = name
    return model


@contextmanager
def frozen_weights_in(model: nn.Module, mixed_precision: str, sharded: bool = False):
    """Within the block, every frozen float32 nn.Linear weight and bias of `model` is held in the autocast dtype of
    accelerate's `mixed_precision` (bf16, fp16; "no" changes nothing); the original tensors come back on exit, bit
    for bit. Autocast would cast them to the same bits at every forward. Weights shared with another module (a tied
    LM head's embedding) are left alone: an embedding lookup is not autocast, so its output dtype would change. So are
    DoRA's base weights, and sharded models (FSDP, DeepSpeed: `sharded`), whose engines own the parameters' storage."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None or sharded:
        yield
        return
    linear = {id(p) for m in model.modules() if type(m) is nn.Linear for p in m.parameters(recurse=False)}
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear for p in m.parameters(recurse=False)}
    # DoRA normalizes W0 + ΔW by its column norms outside any matmul: that needs W0's fp32 bits
    dora = {id(p) for m in model.modules() if any(getattr(m, "use_dora", {}).values())
            for p in m.get_base_layer().parameters(recurse=False)}
    frozen = [p for p in model.parameters() if id(p) in linear and id(p) not in shared | dora
              and not p.requires_grad and p.dtype == torch.float32]
    originals = [p.data for p in frozen]
    try:
        for p in frozen:
            p.data = p.data.to(dtype)
        yield
    finally:
        for p, original in zip(frozen, originals):
            p.data = original
