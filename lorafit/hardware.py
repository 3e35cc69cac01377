"""What this machine can do, asked of torch and measured, not assumed: native bf16, and the peak matmul rate.

CPUs of one cloud machine kind differ: some have AVX512-BF16 or AMX and run bf16 matmuls ~4x faster than fp32,
others emulate bf16 and are slower in it. So `train.mixed_precision=auto` asks torch about this CPU, and MFU is
measured against a matmul probe run here once (cached per machine, precision and thread count), not a spec sheet.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from lorafit.errors import UserError

PROBE_SHAPE = (2048, 384, 1536)  # (m, k, n): a MiniLM-sized activation times an FFN weight


def native_bf16() -> bool:
    """Does this machine compute bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX?"""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(requested: str) -> str:
    """accelerate's mixed_precision for train.mixed_precision: `auto` is bf16 where it is native, else no (fp32)."""
    if requested == "fp16" and not torch.cuda.is_available():  # accelerate would silently run fp32
        raise UserError("train.mixed_precision=fp16 needs a GPU (accelerate has no fp16 autocast on CPU); "
                        "use bf16, auto or no")
    if requested != "auto":
        return requested
    return "bf16" if native_bf16() else "no"


def _machine_key(precision: str) -> str:
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{_cpu_model()} x{torch.get_num_threads()} threads"
    return f"{where} | {precision} | torch {torch.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_matmul_flops(precision: str, cache_file=None, seconds: float = 0.5) -> float:
    """FLOP/s of a plain matmul in `precision` (accelerate's name: no | bf16 | fp16) on this machine, measured once
    and cached in `cache_file` (default: LORAFIT_CACHE/peak_flops.json) under the machine, precision and threads."""
    from lorafit.models import cache_dir

    path = cache_file or cache_dir() / "peak_flops.json"
    key = _machine_key(precision)
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key not in cache:
        cache[key] = _measure(precision, seconds)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return cache[key]


def _measure(precision: str, seconds: float) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    m, k, n = PROBE_SHAPE
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):  # warm up: thread pool, kernel selection
        a @ b
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 5:
        a @ b
        reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * m * k * n * reps / elapsed
