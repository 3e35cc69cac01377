"""The cost of intruder-dimension analysis on Llama-7B shapes, cold (W0's basis computed) and warm (from the cache).

    .venv/bin/python bench/intruders.py [--layers 1]

One layer's seven modules (bench/shrink.py's SHAPES) with random W0 (std 0.02) and a random rank-16 ΔW, run
through `intruder_dimensions` twice with an empty cache dir: the first call decomposes W0, the second reads its
basis back. Times are scaled to the 32 layers of a 7B model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from shrink import SHAPES

from lorafit.analysis.spectrum import intruder_dimensions


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    cold = warm = 0.0
    per_module, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for layer in range(args.layers):
            for name, (d_out, d_in) in SHAPES.items():
                W0 = torch.randn(d_out, d_in, generator=g) * 0.02
                delta = (torch.randn(d_out, 16, generator=g) * 0.02) @ (torch.randn(16, d_in, generator=g) * 0.05)
                t0 = time.perf_counter()
                first = intruder_dimensions(W0, delta, cache=Path(tmp))
                t1 = time.perf_counter()
                second = intruder_dimensions(W0, delta, cache=Path(tmp))
                t2 = time.perf_counter()
                assert first["count"] == second["count"]
                cold, warm = cold + t1 - t0, warm + t2 - t1
                per_module[f"{layer}.{name}"] = (round(t1 - t0, 2), round(t2 - t1, 2))
                counts[f"{layer}.{name}"] = first["count"]
        cache_bytes = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
    scale = 32 / args.layers
    print(json.dumps({"modules": len(per_module), "cold_s": round(cold, 1), "warm_s": round(warm, 1),
                      "cold_s_7b": round(cold * scale), "warm_s_7b": round(warm * scale),
                      "cache_gib_7b": round(cache_bytes * scale / 2**30, 2), "per_module_cold_warm_s": per_module,
                      "intruders": counts, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
