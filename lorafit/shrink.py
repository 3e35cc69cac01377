"""Shrink a LoRA adapter exactly: the best lower-rank adapter for every ΔW, from the r×r core SVD.

`python -m lorafit.shrink ADAPTER (--energy 0.9 | --rank K | --intruders LAMBDA) --out DIR [--overwrite]`

ΔW = s·B·A = (Q_b U) Σ (Q_a V)ᵀ (analysis.spectrum.lowrank_svd), so by Eckart–Young its best rank-k approximation
is B' = Q_b·U_k·√Σ_k, A' = √Σ_k·V_kᵀ·Q_aᵀ, with scale s folded in (each module's alpha is set so its scale is 1).
‖ΔW − ΔW'‖²_F is exactly the dropped tail Σ_{i>k} σᵢ². ΔW is never formed: O((d+k)r²) per module, where peft's and
kohya's resize route runs a dense SVD of the d×k matrix. The output is a plain PEFT adapter (rank_pattern /
alpha_pattern), with the modules saved in full (a classifier head) and lorafit.json / the tokenizer carried over.
`--intruders LAMBDA` instead dampens intruder dimensions (see analysis.spectrum.intruder_dimensions) through peft's
own reduce_intruder_dimension.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.errors import UserError, atomic_dir, check_output


def shrink(adapter: Path, out: Path, energy: float | None = None, rank: int | None = None, overwrite: bool = False) -> dict:
    """Write the truncated adapter to `out`; return the report (also out/shrink_report.json)."""
    from safetensors.torch import save_file

    from lorafit.analysis.spectrum import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, energy_rank, lora_factors, lowrank_svd,
                                           read_adapter, truncated_factors)

    config, state = read_adapter(adapter)
    factors, skipped = lora_factors(config, state)
    if skipped or any(f.magnitude is not None or f.kind in ("conv", "expert") for f in factors):
        raise UserError(f"{adapter}: shrink handles plain LoRA on Linear and Embedding layers; this adapter has DoRA, "
                        f"conv, MoE-expert or incomplete factors ({[s['name'] for s in skipped][:3]})")
    root = lambda k: math.sqrt(k) if config.get("use_rslora") else k  # alpha that gives scale 1 at rank k
    tensors, modules, ranks = {}, [], {}
    for f in factors:
        S, U, V = lowrank_svd(f.B, f.A, f.scale, vectors=True)
        k = max(1, energy_rank(S, energy) if energy is not None else min(rank, len(S)))
        ranks[f.name] = k
        B, A = truncated_factors(S, U, V, k)
        prefix, kind = f"base_model.model.{f.name}", "lora_embedding_" if f.kind == "embedding" else "lora_"
        tensors[f"{prefix}.{kind}A.weight"] = A.to(state_dtype(state, f.name)).contiguous()
        tensors[f"{prefix}.{kind}B.weight"] = B.to(state_dtype(state, f.name)).contiguous()
        total = float((S**2).sum())
        modules.append({"name": f.name, "r": f.rank, "k": k, "energy": total, "tail_energy": float((S[k:] ** 2).sum()),
                        "params": f.rank * sum(f.shape), "params_kept": k * sum(f.shape)})
    for key, tensor in state.items():  # modules saved in full (a seq_cls head) go over unchanged
        if not any(p in key for p in (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B")):
            tensors[key] = tensor.contiguous()
    r_max = max(ranks.values())
    new_config = {**config, "r": r_max, "lora_alpha": root(r_max), "rank_pattern": ranks,
                  "alpha_pattern": {n: root(k) for n, k in ranks.items()}}
    report = {"adapter": str(adapter), "energy": energy, "rank": rank, "modules": modules,
              "params": sum(m["params"] for m in modules), "params_kept": sum(m["params_kept"] for m in modules),
              "energy_kept": 1 - sum(m["tail_energy"] for m in modules) / max(sum(m["energy"] for m in modules), 1e-300)}
    with atomic_dir(out, "shrunk", [adapter], overwrite) as tmp:
        _copy_side_files(adapter, tmp)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(new_config, indent=2))
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / "shrink_report.json").write_text(json.dumps(report, indent=1))
    return report


def dampen_intruders(adapter: Path, out: Path, lam: float, k: int = 10, eps: float = 0.5, base: str | None = None,
                     overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """peft's reduce_intruder_dimension on this adapter: intruder directions of W0 + ΔW scaled by `lam` (0 removes
    them, 1 keeps them), re-factored at the adapter's rank. Needs the float base (the adapter's, or `base`)."""
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from safetensors.torch import load_file, save_file

    from lorafit.analysis.spectrum import ADAPTER_WEIGHTS, read_adapter
    from lorafit.models import build_model
    from lorafit.saved import attach, base_name, run_config

    config, state = read_adapter(adapter)
    base = base_name(adapter, config, base)
    cfg, info = run_config(adapter, state, config, base, trust_remote_code)
    model = attach(build_model(cfg, info.get("labels"), quantize=False), [adapter], base)
    lines: list[str] = []
    reduce_intruder_dimension(model, top_k=k, threshold_epsilon=eps, mitigation_lambda=lam, logging_sink=lines.append)
    counts = peft_intruder_counts(lines)
    with atomic_dir(out, "dampened", [adapter], overwrite) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["intruder_reduced"], safe_serialization=True)
        for f in (tmp / "intruder_reduced").iterdir():  # peft puts a non-default adapter in a subfolder
            f.rename(tmp / f.name)
        (tmp / "intruder_reduced").rmdir()
        # The new adapter's modules saved in full (a seq_cls head) start from the base's; put the trained ones back.
        saved = load_file(tmp / ADAPTER_WEIGHTS)
        full = {k_: v.contiguous() for k_, v in state.items() if ".lora_" not in k_}
        save_file({**saved, **full}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        _copy_side_files(adapter, tmp)
        report = {"adapter": str(adapter), "lambda": lam, "k": k, "eps": eps, "intruders": counts,
                  "total": sum(counts.values())}
        (tmp / "intruder_report.json").write_text(json.dumps(report, indent=1))
    return report


def _copy_side_files(adapter: Path, out: Path) -> None:
    """What lives beside the adapter's own files (tokenizer, lorafit.json) goes over unchanged."""
    for extra in adapter.iterdir():
        if extra.is_file() and not extra.name.startswith("adapter_"):
            shutil.copy2(extra, out / extra.name)


def peft_intruder_counts(lines: list[str]) -> dict[str, int]:
    """{module: intruder count} from the lines reduce_intruder_dimension logs ("NAME: Intruders: N" / "NAME: No
    intruders")."""
    return {l.split(": ")[0].removeprefix("base_model.model."): 0 if "No intruders" in l else int(l.rsplit(" ", 1)[1])
            for l in lines if ": " in l and not l.startswith("Enabling")}


def state_dtype(state: dict, name: str) -> torch.dtype:
    """The dtype the adapter stored this module's factors in (the new factors keep it)."""
    return next(v.dtype for k, v in state.items() if f"{name}.lora_" in k)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lorafit.shrink", description="Truncate every ΔW of an adapter exactly.")
    p.add_argument("adapter", help="a PEFT adapter dir or a lorafit run dir")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--energy", type=float, help="keep the smallest rank holding this share of each ΔW's energy")
    which.add_argument("--rank", type=int, help="keep at most this rank in every module")
    which.add_argument("--intruders", type=float, metavar="LAMBDA",
                       help="instead: scale intruder dimensions by LAMBDA (peft's reduce_intruder_dimension; 0.75 as peft)")
    p.add_argument("--base", help="with --intruders: the float base (default: the adapter's base_model_name_or_path)")
    p.add_argument("--trust-remote-code", action="store_true", help="with --intruders: run the base's own Python code")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not empty and not this kind of output")
    args = p.parse_args(argv)
    if (args.energy is not None and not 0 < args.energy <= 1) or (args.rank is not None and args.rank < 1) or \
            (args.intruders is not None and not 0 <= args.intruders <= 1):
        p.error("--energy must be in (0, 1], --rank >= 1, --intruders in [0, 1]")
    return args


@user_errors_as_one_line
def main(argv=None) -> dict:
    quiet_libraries()
    from lorafit.analysis.spectrum import adapter_dir

    args = parse_args(argv)
    adapter = adapter_dir(args.adapter)
    # Before any work: --out may not replace the adapter or the run dir holding it (errors.check_output).
    check_output(args.out, "dampened" if args.intruders is not None else "shrunk", [adapter, args.adapter], args.overwrite)
    if args.intruders is not None:
        report = dampen_intruders(adapter, args.out, args.intruders, base=args.base, overwrite=args.overwrite,
                                  trust_remote_code=args.trust_remote_code)
        print(f"intruder dimensions scaled by {args.intruders} in {sum(c > 0 for c in report['intruders'].values())} of "
              f"{len(report['intruders'])} modules ({report['total']} in all); {args.out}")
        return report
    report = shrink(adapter, args.out, args.energy, args.rank, overwrite=args.overwrite)
    print(f"shrank {len(report['modules'])} modules: {report['params']:,} -> {report['params_kept']:,} LoRA parameters "
          f"({report['params_kept'] / report['params']:.1%}), {report['energy_kept']:.2%} of ΔW energy kept; {args.out}")
    return report


if __name__ == "__main__":
    main()
