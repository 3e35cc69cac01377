"""Benchmark: the exact ΔW spectrum of a Llama-7B-shaped adapter set, from r×r cores, on CPU.

32 layers × (q, k, v, o: 4096×4096; gate, up: 4096→11008; down: 11008→4096) at r=16, all metrics, no plots.
Against: a full SVD of the formed ΔW (what a user without the QR trick does) on a sample of those matrices,
which also gives the float64 reference for the error.

    .venv/bin/python bench/spectrum.py [--layers 32] [--rank 16] [--sample 3]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lorafit.analysis.report import analyze

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}  # (d_out, d_in)


def adapter(layers: int, r: int) -> tuple[dict, dict]:
    g, state = torch.Generator().manual_seed(0), {}
    for i in range(layers):
        for name, (d, k) in SHAPES.items():
            key = f"base_model.model.model.layers.{i}.mlp.{name}" if "proj" in name and name in ("gate_proj", "up_proj", "down_proj") \
                else f"base_model.model.model.layers.{i}.self_attn.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            state[f"{key}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.01
    return {"r": r, "lora_alpha": 2 * r, "target_modules": list(SHAPES)}, state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sample", type=int, default=3, help="matrices for the full-SVD comparison")
    args = p.parse_args()
    config, state = adapter(args.layers, args.rank)
    analyze(config, dict(list(state.items())[:4]))  # warm-up: first LAPACK calls and imports
    t0 = time.perf_counter()
    doc = analyze(config, state)
    ours = time.perf_counter() - t0
    n = len(doc["modules"])

    names = ["q_proj", "gate_proj", "down_proj"][: args.sample]
    full_times, errors = [], []
    for m in doc["modules"][:7]:
        if m["type"] not in names:
            continue
        key = f"base_model.model.{m['name']}"
        dW = m["scale"] * state[f"{key}.lora_B.weight"].double() @ state[f"{key}.lora_A.weight"].double()
        t0 = time.perf_counter()
        ref = torch.linalg.svdvals(dW)[: args.rank]  # float64 full SVD: the reference and the naive cost
        full_times.append(time.perf_counter() - t0)
        errors.append(float(((torch.tensor(m["singular_values"], dtype=torch.float64) - ref).abs() / ref).max()))
    per_module_ours = ours / n
    per_module_full = sum(full_times) / len(full_times)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"adapter: {args.layers} layers x {len(SHAPES)} modules = {n} ΔW at r={args.rank}")
    print(f"lorafit analyze (all metrics, no plots): {ours:.3f} s total, {1e3 * per_module_ours:.2f} ms/module")
    print(f"full float64 SVD of formed ΔW ({', '.join(names)}): {per_module_full:.2f} s/module on average")
    print(f"speed-up per module: {per_module_full / per_module_ours:,.0f}x; for all {n}: ~{per_module_full * n / 60:.0f} min vs {ours:.2f} s")
    print(f"max relative error of σ vs float64 full SVD: {max(errors):.1e}")


if __name__ == "__main__":
    main()
