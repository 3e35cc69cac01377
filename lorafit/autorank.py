"""lora.r=auto: train at lora.r_max, shrink every adapter inside the run, train on at the chosen ranks.

At step ceil(lora.auto_shrink_at · steps), every ΔW = s·B·A is replaced by its exact Eckart–Young truncation to the
smallest rank k holding lora.auto_energy of its energy (lorafit.shrink's math on the live model, scale s kept):
B' = Q_b·U_k·√(Σ_k/s), A' = √(Σ_k/s)·V_kᵀ·Q_aᵀ, so ‖ΔW − ΔW'‖²_F is exactly the dropped tail Σ_{i>k} σᵢ².

Why the tensors keep their r_max shape: B' fills the first k columns of B and A' the first k rows of A, the rest is
set to exactly zero, and it stays zero. A zero column of B and the matching zero row of A get zero gradient
(∂L/∂B[:, j] ∝ A[j]·x and ∂L/∂A[j] ∝ B[:, j]), and with their Adam moments zero too, AdamW's step and its weight
decay leave them at zero. The model computes the rank-k adapter from the shrink on, and no tensor changes shape: DDP,
FSDP2 and DeepSpeed need no re-prepare, and a checkpoint after the shrink resumes like any other. After training,
`cut` slices the tensors to the chosen ranks, so the hooks, the merge check and the saved adapter see the small
adapter. The price: steps after the shrink still compute LoRA at r_max (a small share of a step).

Adam's moments (lora.auto_moments):
- project: the new factors are linear maps of the old ones, B' = B·M and A' = N·A (M = B⁺B', N = A'A⁺), and the
  gradients map alike: ∂L/∂B' = ∂L/∂B·Nᵀ, ∂L/∂A' = Mᵀ·∂L/∂A. The first moment is mapped exactly so; the second
  (element-wise squares) as if its coordinates were independent: v_B' = v_B·(N∘N)ᵀ, v_A' = (M∘M)ᵀ·v_A.
- reset: the moments of the LoRA factors start over (Adam's step count too, for its bias correction), with a linear
  learning-rate warm-up over lora.auto_warmup steps after the shrink.
"""

from __future__ import annotations

import math

import torch

from lorafit.errors import UserError


def shrink_step(cfg, total: int, accelerator, model) -> int | None:
    """The step the shrink happens after (None: lora.r is not auto); what it can't shrink is refused here, before
    training."""
    if cfg.lora.r != "auto":
        return None
    lora_pairs(accelerator.unwrap_model(model))
    if cfg.lora.auto_moments == "reset" and accelerator.distributed_type == "DEEPSPEED":
        raise UserError("lora.auto_moments=reset restarts Adam's step count per parameter, which DeepSpeed keeps per "
                        "group: use lora.auto_moments=project with DeepSpeed")
    return min(total, max(1, math.ceil(total * cfg.lora.auto_shrink_at)))


def lora_pairs(model) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter, float]]:
    """(module name, A weight, B weight, scale) of every LoRA Linear of the trained adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if "default" in getattr(mod, "lora_embedding_A", {}):  # peft keeps an Embedding's factors apart
            raise UserError(f"lora.r=auto shrinks LoRA on Linear layers; {name} is an Embedding: leave it out of "
                            "lora.target_modules or set an integer lora.r")
        if "default" in mod.lora_A:
            out.append((name.removeprefix("base_model.model."), mod.lora_A["default"].weight,
                        mod.lora_B["default"].weight, mod.scaling["default"]))
    return out


class _Engine:
    """Whole tensors of a parameter and of its Adam moments, read and written the same way under every engine.
    Under FSDP2 and DeepSpeed these are collectives: every process calls them, in the same order."""

    def __init__(self, accelerator, optimizer):
        self.deepspeed = accelerator.distributed_type == "DEEPSPEED"
        self.multi = accelerator.num_processes > 1
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> torch's optimizer

    def get(self, p, key: str | None = None) -> torch.Tensor | None:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            x = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        else:
            x = p.detach() if key is None else self.optimizer.state.get(p, {}).get(key)
        if x is None:
            return None
        return (x.full_tensor() if hasattr(x, "full_tensor") else x).double().cpu()  # FSDP2: DTensor shards

    def set(self, p, value: torch.Tensor, key: str | None = None) -> None:
        if self.multi:  # every process takes the main process's numbers: one truncation for all
            value = value.to(p.device if not self.deepspeed else "cpu")
            torch.distributed.broadcast(value, 0)
        if self.deepspeed:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            if key is not None:
                safe_set_full_optimizer_state(p, value.float(), key)
                return
            safe_set_full_fp32_param(p, value.float())  # the fp32 master copy; the module's own copy too, below:
            if hasattr(p, "ds_id"):  # ZeRO-3: the module holds a shard, put back from the main process's value
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
            return
        target = p.data if key is None else self.optimizer.state[p][key]
        if hasattr(target, "full_tensor"):  # FSDP2: this process's shard of the whole value
            from torch.distributed.tensor import distribute_tensor

            target.to_local().copy_(distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements).to_local())
        else:
            target.copy_(value.to(target.dtype))

    def reset_steps(self, params) -> None:  # not under DeepSpeed (shrink_step refuses it): one count per flat group
        for p in params:
            if "step" in self.optimizer.state.get(p, {}):
                self.optimizer.state[p]["step"].zero_()


def shrink(model, optimizer, accelerator, energy: float, moments: str) -> dict:
    """Truncate every adapter of the live (prepared) model in place, and map or reset its Adam moments. Returns the
    record: each module's rank and energies."""
    from lorafit.analysis.spectrum import energy_rank, lowrank_svd, truncated_factors

    engine, modules, reset = _Engine(accelerator, optimizer), [], []
    for name, pa, pb, s in lora_pairs(accelerator.unwrap_model(model)):
        A, B = engine.get(pa), engine.get(pb)
        r = A.shape[0]
        S, U, V = lowrank_svd(B, A, s, vectors=True)
        k = max(1, energy_rank(S, energy))
        Bk, Ak = truncated_factors(S, U, V, k, s)
        new_B, new_A = torch.zeros_like(B), torch.zeros_like(A)
        new_B[:, :k], new_A[:k] = Bk, Ak
        if moments == "project":
            M, N = torch.linalg.pinv(B) @ new_B, new_A @ torch.linalg.pinv(A)  # r×r: B' = B·M, A' = N·A
            for p, first, second in ((pb, lambda m: m @ N.T, lambda v: v @ (N * N).T),
                                     (pa, lambda m: M.T @ m, lambda v: (M * M).T @ v)):
                for key, f in (("exp_avg", first), ("exp_avg_sq", second)):
                    if (m := engine.get(p, key)) is not None:
                        engine.set(p, f(m), key)
        else:
            for p in (pb, pa):
                for key in ("exp_avg", "exp_avg_sq"):
                    if (m := engine.get(p, key)) is not None:
                        engine.set(p, torch.zeros_like(m), key)
            reset += [pb, pa]
        engine.set(pb, new_B)
        engine.set(pa, new_A)
        modules.append({"name": name, "r": r, "k": k, "energy": float((S ** 2).sum()),
                        "tail_energy": float((S[k:] ** 2).sum()), "shape": [B.shape[0], A.shape[1]]})
    engine.reset_steps(reset)
    total = sum(m["energy"] for m in modules)
    return {"ranks": {m["name"]: m["k"] for m in modules}, "modules": modules,
            "params_before": sum(m["r"] * sum(m["shape"]) for m in modules),
            "params_after": sum(m["k"] * sum(m["shape"]) for m in modules),
            "energy_kept": 1 - sum(m["tail_energy"] for m in modules) / total if total else 1.0}


def shrink_in_run(model, optimizer, accelerator, lo, step: int, say) -> dict:
    """The shrink at `step` of the loop, with its record (what summary.json and the checkpoints keep)."""
    record = {"step": step, "r_max": lo.r_max, "energy": lo.auto_energy, "moments": lo.auto_moments,
              **shrink(model, optimizer, accelerator, lo.auto_energy, lo.auto_moments)}
    ranks = record["ranks"].values()
    say(f"step {step}: lora.r=auto shrank {len(ranks)} modules to ranks {min(ranks)}-{max(ranks)}: "
        f"{record['params_before']:,} -> {record['params_after']:,} LoRA parameters, {record['energy_kept']:.2%} of "
        "ΔW's energy kept")
    return record


def warm_up(optimizer, scheduler, step: int, shrunk: dict | None, lo) -> None:
    """lora.auto_moments=reset: after the shrink, the restarted moments get the schedule's lr ramped up again."""
    if shrunk and lo.auto_moments == "reset":
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr * warmup_factor(step + 1, shrunk["step"], lo.auto_warmup)


def warmup_factor(step: int, at: int, warmup: int) -> float:
    """lora.auto_moments=reset: the learning rate's share at `step`, ramping up over `warmup` steps after the shrink."""
    if warmup <= 0 or not at < step <= at + warmup:
        return 1.0
    return (step - at) / (warmup + 1)


def cut(model, ranks: dict, use_rslora: bool) -> None:
    """Slice the (unwrapped, unsharded) model's LoRA tensors to `ranks`: what the shrink left nonzero. The scale of
    every module stays s = alpha / r_max; its alpha becomes s·k (s·√k with rsLoRA) and peft's config records the
    ranks as rank_pattern / alpha_pattern, so the saved adapter loads in plain peft as the model computed it."""
    from peft.tuners.lora import LoraLayer

    root = math.sqrt if use_rslora else (lambda k: k)
    alphas = {}
    for name, mod in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if not isinstance(mod, LoraLayer) or key not in ranks:
            continue
        k, a, b, s = ranks[key], mod.lora_A["default"], mod.lora_B["default"], mod.scaling["default"]
        if a.weight[k:].count_nonzero() or b.weight[:, k:].count_nonzero():
            raise RuntimeError(f"{key}: the directions dropped at the shrink are no longer zero")
        small_a = torch.nn.Linear(a.in_features, k, bias=False, device=a.weight.device, dtype=a.weight.dtype)
        small_b = torch.nn.Linear(k, b.out_features, bias=b.bias is not None, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            small_a.weight.copy_(a.weight[:k])
            small_b.weight.copy_(b.weight[:, :k])
            if b.bias is not None:
                small_b.bias.copy_(b.bias)
        mod.lora_A["default"], mod.lora_B["default"] = small_a, small_b
        mod.r["default"], mod.lora_alpha["default"] = k, s * root(k)
        alphas[key] = s * root(k)
    config = model.peft_config["default"]
    config.r, config.lora_alpha = max(ranks.values()), max(alphas.values(), default=config.lora_alpha)
    config.rank_pattern, config.alpha_pattern = dict(ranks), alphas
