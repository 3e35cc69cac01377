"""The spectrum of every LoRA update ΔW = s·B·A, computed exactly without forming ΔW.

With B (d×r) and A (r×k): QR(B) = Q_b R_b and QR(Aᵀ) = Q_a R_a give ΔW = Q_b (s R_b R_aᵀ) Q_aᵀ, so the
singular values of ΔW are those of the r×r core s·R_b·R_aᵀ, and its singular vectors are Q_b·U and Q_a·V.
Cost O((d+k)r²) instead of O(dk·min(d,k)); done in float64, so exact to float64 rounding.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import UserError

ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, vectors: bool = False):
    """Singular values (descending) of scale·B·A, and with `vectors` also (U, V) with scale·B·A = U diag(S) Vᵀ."""
    Qb, Rb = torch.linalg.qr(B.detach().double())
    Qa, Ra = torch.linalg.qr(A.detach().double().T)
    U, S, Vh = torch.linalg.svd(scale * (Rb @ Ra.T))
    return (S, Qb @ U, Qa @ Vh.T) if vectors else S


def truncated_factors(S: torch.Tensor, U: torch.Tensor, V: torch.Tensor, k: int, scale: float = 1.0):
    """Eckart–Young from lowrank_svd's (S, U, V): the rank-k factors (B', A') whose scale·B'·A' is the best rank-k
    approximation of the update, ‖ΔW − ΔW'‖²_F = Σ_{i>k} σᵢ²; the singular values are split evenly between them."""
    root = (S[:k] / scale).sqrt()
    return U[:, :k] * root, root[:, None] * V[:, :k].T


# --- rank metrics of a spectrum (all from the singular values: Eckart–Young) -------------------------------------

def energy_rank(sigma: torch.Tensor, threshold: float) -> int:
    """Smallest k whose top-k energy Σσᵢ² reaches `threshold` of the total (0 for a zero update)."""
    energy = sigma.double() ** 2
    total = energy.sum()
    if total == 0:
        return 0
    frac = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(frac, torch.tensor(threshold, dtype=frac.dtype) - 1e-12).item()) + 1


def effective_rank(sigma: torch.Tensor) -> float:
    """exp of the Shannon entropy of pᵢ = σᵢ²/Σσ² (1 for a rank-1 update, r for a flat spectrum)."""
    p = sigma.double() ** 2
    if p.sum() == 0:
        return 0.0
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum_metrics(sigma: torch.Tensor) -> dict:
    s = sigma.double()
    fro, top = float(s.norm()), float(s[0]) if len(s) else 0.0
    return {
        "fro_norm": fro,
        "spectral_norm": top,
        "r90": energy_rank(s, 0.90),
        "r95": energy_rank(s, 0.95),
        "r99": energy_rank(s, 0.99),
        "effective_rank": effective_rank(s),
        "stable_rank": fro**2 / top**2 if top > 0 else 0.0,
        "elbow_rank": int((s >= 0.1 * top).sum()) if top > 0 else 0,  # σᵢ/σ₁ ≥ 0.1 ends at the elbow
        "condition": top / float(s[-1]) if len(s) and s[-1] > 0 else None,  # None: a zero singular value
    }


# --- reading an adapter ----------------------------------------------------------------------------------------

@dataclass
class LoraFactors:
    name: str  # module path inside the base model, e.g. bert.encoder.layer.0.attention.self.query
    A: torch.Tensor  # r × k (in)
    B: torch.Tensor  # d (out) × r
    scale: float
    kind: str = "linear"  # linear | embedding | conv | expert
    magnitude: torch.Tensor | None = None  # DoRA's per-output-row magnitude vector
    expert: int | None = None  # kind expert: which expert of a 3-D MoE parameter (peft's target_parameters)

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter dir itself, or a lorafit run dir's adapter/."""
    path = Path(path)
    return path / "adapter" if (path / "adapter" / ADAPTER_CONFIG).is_file() else path


def read_adapter(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) from a PEFT adapter dir, or a run dir holding adapter/."""
    path = adapter_dir(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such adapter dir")
    if not (path / ADAPTER_CONFIG).is_file():
        full = next((d for d in (path / "model", path) if (d / "config.json").is_file()), None)
        if full is not None:  # a lora=full run dir (run_dir/model) or a merged model: no adapter in it
            raise UserError(f"{path}: holds a full model ({full}), not a LoRA adapter; lorafit.generate and "
                            "lorafit.compress take it as it is")
        raise UserError(f"{path}: not a PEFT adapter (no {ADAPTER_CONFIG}); pass an adapter dir or a lorafit run dir")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / ADAPTER_CONFIG}: corrupt JSON ({e})") from None
    if (path / ADAPTER_WEIGHTS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return config, load_file(path / ADAPTER_WEIGHTS)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / ADAPTER_WEIGHTS}: corrupt safetensors file ({e})") from None
    if (path / PICKLE_WEIGHTS).is_file():
        if not allow_pickle:
            raise UserError(f"{path / PICKLE_WEIGHTS} is a pickle file, which can run code when loaded; "
                            "re-save it as safetensors, or pass --allow-pickle if you trust it")
        return config, torch.load(path / PICKLE_WEIGHTS, map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no {ADAPTER_WEIGHTS} in the adapter dir")


def _scale(config: dict, name: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_factors(config: dict, state: dict[str, torch.Tensor]) -> tuple[list[LoraFactors], list[dict]]:
    """Every adapted module's factors with its effective scale, and the modules skipped with a reason."""
    found, skipped = {}, []
    for key, tensor in state.items():
        for part, kind in (("lora_A", "linear"), ("lora_B", "linear"), ("lora_embedding_A", "embedding"),
                           ("lora_embedding_B", "embedding"), ("lora_magnitude_vector", "linear")):
            marker = f".{part}."
            if marker in key or key.endswith(f".{part}"):
                name = key.split(marker)[0] if marker in key else key[: -len(part) - 1]
                name = name.removeprefix("base_model.model.")
                found.setdefault(name, {"kind": kind})[part.replace("embedding_", "")] = tensor
    out = []
    for name, parts in sorted(found.items(), key=lambda kv: _natural_key(kv[0])):
        A, B = parts.get("lora_A"), parts.get("lora_B")
        if A is None or B is None:
            skipped.append({"name": name, "reason": "incomplete factors (lora_A or lora_B missing)"})
            continue
        kind = parts["kind"]
        # Embedding LoRA stores A as r×vocab and B as dim×r: ΔE = (B·A)ᵀ has the same spectrum as B·A.
        if A.dim() == 4:  # conv LoRA: A is a conv r×in×kh×kw, B a 1×1 conv; flatten to the matrix it applies
            kind, A, B = "conv", A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        r = A.shape[0]
        if r == 0:
            skipped.append({"name": name, "reason": "rank 0"})
            continue
        if _is_param_wrapper(config, name):
            found_experts = _experts(config, name, A, B)
            if found_experts is None:
                skipped.append({"name": name, "reason": "MoE experts: the base's expert count (config.json) or the "
                                "rank and alpha of this tensor are not readable"})
                continue
            out += expert_factors(A.float(), B.float(), *found_experts)
            continue
        out.append(LoraFactors(name, A.float(), B.float(), _scale(config, name, r), kind,
                               parts.get("lora_magnitude_vector")))
    return out, skipped


def _is_param_wrapper(config: dict, name: str) -> bool:
    """peft's LoRA on a 3-D parameter (target_parameters): the wrapped module is the experts container, whose
    factors stack one rank-r pair per expert (peft nests one wrapper per parameter: experts, experts.base_layer)."""
    # e.g. gate_up_proj, down_proj (peft's all-linear), or mlp.experts.gate_up_proj (lora.target_parameters)
    return bool(config.get("target_parameters")) and name.split(".base_layer")[0].rsplit(".", 1)[-1] == "experts"


def _experts(config: dict, name: str, A: torch.Tensor, B: torch.Tensor) -> tuple[int, str, float] | None:
    """(experts, the tensor's name, scale) of a wrapper's factors. peft keeps no tensor name in the saved keys, so it
    is the targeted tensor whose configured rank (rank_pattern: lora.r_expert, or the 2r peft 0.21 sets for a fused
    gate_up_proj) gives the factors' size, and where ranks tie, whose shape fits (gate_up_proj: hidden -> 2 x the
    expert width; down_proj: back); its alpha_pattern entry gives the scale. None where the base config or a unique
    match is missing."""
    from peft.utils.other import get_pattern_key

    from lorafit.models import resolve

    try:
        base = json.loads((Path(resolve(config.get("base_model_name_or_path") or "")) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = base.get("num_experts") or base.get("num_local_experts")
    if not n or A.shape[0] % n or B.shape[1] != A.shape[0]:
        return None
    container = name.split(".base_layer")[0]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    hidden, width = base.get("hidden_size"), base.get("moe_intermediate_size") or base.get("intermediate_size")
    shapes = {"gate_up_proj": (2 * width, hidden), "down_proj": (hidden, width)} if hidden and width else {}
    fits = {}
    for p in {p.rsplit(".", 1)[-1] for p in config.get("target_parameters") or []}:
        key = f"{container}.{p}"
        if ranks.get(get_pattern_key(ranks.keys(), key), config["r"]) == A.shape[0] // n:
            fits[p] = alphas.get(get_pattern_key(alphas.keys(), key), config["lora_alpha"])
    if len(fits) > 1:
        fits = {p: a for p, a in fits.items() if shapes.get(p) == (B.shape[0], A.shape[1])} or fits
    if len(set(fits.values())) != 1:
        return None
    r, alpha = A.shape[0] // n, next(iter(fits.values()))
    label = f"{container}.{next(iter(fits))}" if len(fits) == 1 else name  # equal ranks and alphas: the wrapper's name
    return n, label, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def expert_factors(A: torch.Tensor, B: torch.Tensor, experts: int, name: str, scale: float) -> list[LoraFactors]:
    """Each expert's own (A_e, B_e), so its ΔW_e = s·B_e·A_e is analysed apart: peft (lora.ParamWrapper) stacks A
    expert-major ((E·r) × in, rows e·r..e·r+r-1) and B expert-minor (out × (r·E), columns j·E + e)."""
    r = A.shape[0] // experts
    A_e, B_e = A.reshape(experts, r, A.shape[1]), B.reshape(B.shape[0], r, experts)
    return [LoraFactors(f"{name}.expert{e}", A_e[e], B_e[:, :, e], scale, "expert", expert=e) for e in range(experts)]


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def module_type(name: str) -> str:
    """The module's own name (query, q_proj, ...): what the report groups by; an expert, by its tensor."""
    parts = name.split(".")
    if parts[-1].startswith("expert") and parts[-1][6:].isdigit():  # ...mlp.experts.gate_up_proj.expert3
        return parts[-2]
    return parts[-1]


def layer_index(name: str) -> int | None:
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return nums[0] if nums else None


# --- against the base weight W0 (LoRA paper §7) -------------------------------------------------------------------

EXACT_SVD_MAX_DIM = 1024  # W0 spectra up to this min-dimension are exact; above, randomized (Halko et al.)
RANDOMIZED_Q = 256


def dora_delta(f: LoraFactors, W0: torch.Tensor) -> torch.Tensor:
    """DoRA's effective update: W' - W0 with W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row (peft's norm over dim 1)."""
    V = W0.double() + f.scale * (f.B.double() @ f.A.double())
    return (f.magnitude.double() / V.norm(dim=1)).unsqueeze(1) * V - W0.double()


def top_spectrum(W: torch.Tensor, q: int = RANDOMIZED_Q) -> tuple[torch.Tensor, bool]:
    """(leading singular values of W, exact?): all of them for small W, the top q by randomized SVD for large W."""
    if min(W.shape) <= EXACT_SVD_MAX_DIM:
        return torch.linalg.svdvals(W.double()), True
    torch.manual_seed(0)  # svd_lowrank draws a random test matrix: fix it so reports are reproducible
    _, S, _ = torch.svd_lowrank(W.float(), q=min(q, min(W.shape)), niter=4)
    return S.double(), False


def base_metrics(W0: torch.Tensor, delta_fro: float, U: torch.Tensor, V: torch.Tensor) -> dict:
    """‖ΔW‖/‖W0‖, ‖UᵀW0V‖_F for ΔW's top-r directions vs W0's own and random ones, amplification, W0's ranks."""
    W = W0.double()
    r = U.shape[1]
    sigma, exact = top_spectrum(W0)
    total = float((W**2).sum())  # exact total energy, even when only the top of the spectrum was computed
    g = torch.Generator().manual_seed(0)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], r, generator=g, dtype=torch.float64))[0]
    Vr = torch.linalg.qr(torch.randn(W.shape[1], r, generator=g, dtype=torch.float64))[0]
    proj = float((U.T @ W @ V).norm())
    cum = torch.cumsum(sigma**2, 0) / total if total > 0 else torch.zeros_like(sigma)

    def w0_rank(thr):  # None when the computed top-q part of the spectrum holds less than thr of the energy
        hit = (cum >= thr - 1e-12).nonzero()
        return int(hit[0]) + 1 if len(hit) else None

    return {
        "w0_fro_norm": total**0.5, "delta_over_w0": delta_fro / total**0.5 if total > 0 else None,
        "uWv_fro": proj, "uWv_fro_w0_top": float(sigma[:r].norm()), "uWv_fro_random": float((Ur.T @ W @ Vr).norm()),
        "amplification": delta_fro / proj if proj > 0 else None,
        "w0_r90": w0_rank(0.9), "w0_r99": w0_rank(0.99), "w0_spectrum_exact": exact,
    }


INTRUDER_K, INTRUDER_EPS = 10, 0.5  # Shuttleworth et al. 2024 and peft's reduce_intruder_dimension


def intruder_dimensions(W0: torch.Tensor, delta: torch.Tensor, k: int = INTRUDER_K, eps: float = INTRUDER_EPS,
                        cache: Path | None = None) -> dict:
    """Intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"): among the top-k left singular
    vectors of W0 + ΔW, those whose max |cos| against every left singular vector of W0 is below eps.

    Small matrices: exact SVDs in float64. Large ones (min dimension > EXACT_SVD_MAX_DIM): the top k of W0 + ΔW by
    Lanczos iterations on matrix-vector products (scipy's svds), and W0's full left basis in float32, cached on disk
    by W0's content (`cache`), so a base is decomposed once for every adapter analysed against it. Only this
    module's W0 (and W0 + ΔW) is ever in memory.
    """
    small = min(W0.shape) <= EXACT_SVD_MAX_DIM
    W = (W0.double() if small else W0.float()) + delta.to(torch.float64 if small else torch.float32)
    if small:
        U, S, _ = torch.linalg.svd(W, full_matrices=False)
        U, S = U[:, :k], S[:k]
    else:  # Lanczos (ARPACK) on matvecs: converges on the flat spectra of real weights, where randomized SVD's
        # later vectors do not (it got 8 intruders where the exact answer was 4 on a 1100×1030 test matrix)
        import numpy as np
        from scipy.sparse.linalg import svds

        u, s, _ = svds(W.numpy(), k=min(k, min(W.shape) - 1), random_state=0, v0=np.ones(min(W.shape), np.float32))
        order = np.argsort(-s)
        U, S = torch.from_numpy(u[:, order].copy()), torch.from_numpy(s[order].copy())
    U0 = _left_basis(W0, None if small else cache)
    cos = (U.T.to(U0.dtype) @ U0).abs().max(1).values.double()
    hit = cos < eps
    return {"count": int(hit.sum()), "positions": hit.nonzero()[:, 0].tolist(), "sigma": S[hit].double().tolist(),
            "max_cos": cos.tolist()}


def _left_basis(W0: torch.Tensor, cache: Path | None) -> torch.Tensor:
    """Every left singular vector of W0 (min(d, k) of them); from `cache` when this very W0 was decomposed before."""
    if cache is None:
        return torch.linalg.svd(W0.double() if min(W0.shape) <= EXACT_SVD_MAX_DIM else W0.float(), full_matrices=False)[0]
    import hashlib

    from safetensors.torch import load_file, save_file

    path = cache / f"{hashlib.sha1(W0.float().contiguous().numpy().tobytes()).hexdigest()}.safetensors"
    if path.is_file():
        return load_file(path)["U"].float()
    U = torch.linalg.svd(W0.float(), full_matrices=False)[0]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"U": U.half().contiguous()}, tmp)  # fp16: cosines to ~1e-3, far inside the eps = 0.5 decision
    tmp.replace(path)
    return U


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) for all i ≤ r1, j ≤ r2 (Hu et al. 2021, eq. 4)."""
    sq = (U1.T.double() @ U2.double()) ** 2  # r1 × r2
    cum = sq.cumsum(0).cumsum(1)
    i = torch.arange(1, sq.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, sq.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)
