"""lorafit.shrink (r×r core SVD) vs the dense-SVD route of kohya's resize_lora and peft's conversion, on a 7B shape.

    .venv/bin/python bench/shrink.py [--layers 32] [--dense-layers 1] [--r 16]

The adapter has Llama-7B's shapes (per layer q,k,v,o 4096×4096; gate, up 11008×4096; down 4096×11008), rank r,
random factors, saved as a PEFT adapter. lorafit's side is the whole `shrink()` call on that dir (read, truncate
to 90% energy, write). The dense side forms ΔW = s·B·A and runs torch.linalg.svd on it, as those tools do, for
`--dense-layers` layers only (a dense SVD of every 7B module takes hours on 2 cores); its time is scaled to all
layers. Both sides are checked to keep the same ranks and the same singular values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (out, in)


def write_adapter(path: Path, layers: int, r: int) -> None:
    from safetensors.torch import save_file

    g, tensors = torch.Generator().manual_seed(0), {}
    for layer in range(layers):
        for name, (d_out, d_in) in SHAPES.items():
            kind = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{name}"
            decay = torch.logspace(0, -2, r)[:, None]  # a spread spectrum, like a trained adapter's
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * decay / d_in**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.01
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(SHAPES), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "llama-7b-shaped", "use_rslora": False}))


def dense_route(adapter: Path, layers: int, energy: float) -> tuple[float, dict]:
    """Form ΔW and SVD it, module by module, for the first `layers` layers; return (seconds, {name: (k, σ)})."""
    from lorafit.analysis.spectrum import energy_rank, lora_factors, read_adapter

    factors, _ = lora_factors(*read_adapter(adapter))
    factors = [f for f in factors if int(f.name.split(".")[2]) < layers]
    out, t0 = {}, time.perf_counter()
    for f in factors:
        delta = f.scale * (f.B @ f.A)  # d×k, fp32, as the dense tools hold it
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        k = energy_rank(S, energy)
        _ = (U[:, :k] * S[:k].sqrt(), S[:k].sqrt()[:, None] * Vh[:k])
        out[f.name] = (k, S[: f.rank].double())
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--energy", type=float, default=0.9)
    args = p.parse_args()
    from lorafit.analysis.spectrum import lora_factors, lowrank_svd, read_adapter
    from lorafit.shrink import shrink

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "a"
        write_adapter(adapter, args.layers, args.r)
        t0 = time.perf_counter()
        report = shrink(adapter, Path(tmp) / "s", energy=args.energy)
        lorafit_s = time.perf_counter() - t0
        dense_s, dense = dense_route(adapter, args.dense_layers, args.energy)
        ks = {m["name"]: m["k"] for m in report["modules"]}
        factors, _ = lora_factors(*read_adapter(adapter))
        for f in factors:
            if f.name in dense:
                S = lowrank_svd(f.B, f.A, f.scale)
                assert ks[f.name] == dense[f.name][0], f.name
                assert torch.allclose(S, dense[f.name][1], rtol=1e-3, atol=1e-6 * float(S[0])), f.name
    modules, dense_modules = len(report["modules"]), len(dense)
    dense_all = dense_s * modules / dense_modules
    print(json.dumps({"modules": modules, "r": args.r, "lorafit_shrink_s": round(lorafit_s, 3),
                      "dense_s_measured": round(dense_s, 2), "dense_modules_measured": dense_modules,
                      "dense_s_all_modules": round(dense_all, 1), "speedup": round(dense_all / lorafit_s, 1),
                      "params": report["params"], "params_kept": report["params_kept"],
                      "energy_kept": round(report["energy_kept"], 4), "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
