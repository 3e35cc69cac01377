"""Turn an adapter into `analysis/spectrum.json`, `report.md` and plots.

spectrum.json (schema 1):
  {"schema": 1, "energy_target": 0.9,
   "adapter": {r, lora_alpha, use_rslora, use_dora, target_modules},
   "modules": [{"name", "type", "layer", "kind", "shape": [d_out, d_in], "rank", "scale",
                "singular_values": [...],                      # of the scaled ΔW, descending, length = rank
                "fro_norm", "spectral_norm", "r90", "r95", "r99", "effective_rank", "stable_rank",
                "elbow_rank", "condition",                     # σ₁/σ_r; null if σ_r = 0
                "suggested_rank",                              # energy rank at energy_target (≥ 1)
                "dora": "exact" | "direction-only" | absent,   # DoRA: exact needs W0
                "base": {...} | absent,                        # with W0: see spectrum.base_metrics
                "phi": {"<other>": [[φ(i,j)]]} | absent}],     # with --compare, left singular subspaces
   "skipped": [{"name", "reason"}],
   "advice": {"energy_target", "global_r", "rank_pattern", "override", "params_now",
              "params_rank_pattern", "params_global_r"}}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lorafit.errors import UserError
from lorafit.metrics import mean

from lorafit.analysis.spectrum import (INTRUDER_EPS, INTRUDER_K, base_metrics, dora_delta, energy_rank, intruder_dimensions,
                                       layer_index, lora_factors, lowrank_svd, module_type, spectrum_metrics,
                                       subspace_similarity)


def analyze(config: dict, state: dict, energy: float = 0.9, base=None, compare: dict | None = None,
            intruders: tuple[int, float] | None = (INTRUDER_K, INTRUDER_EPS), svd_cache: Path | None = None) -> dict:
    """The spectrum document for one adapter. `base`: name -> W0 (see analysis.base); `compare`: {label: (config, state)};
    `intruders`: (top k, eps) of the intruder-dimension count, with a base (None: skip it)."""
    factors, skipped = lora_factors(config, state)
    others = {label: {f.name: f for f in lora_factors(c, s)[0]} for label, (c, s) in (compare or {}).items()}
    for label, theirs in others.items():
        if not set(theirs) & {f.name for f in factors}:
            raise UserError(f"--compare {label}: it adapts none of this adapter's modules; compare adapters of one base")
    modules = []
    for f in tqdm(factors, desc="spectrum", disable=len(factors) < 64, leave=False):
        W0 = base(f.name) if base is not None else None
        entry = {"name": f.name, "type": module_type(f.name), "layer": layer_index(f.name), "kind": f.kind,
                 "shape": list(f.shape), "rank": f.rank, "scale": f.scale}
        if f.magnitude is not None and W0 is not None:  # DoRA, exactly: full rank in general, so a full SVD
            U_all, S, Vh = torch.linalg.svd(dora_delta(f, W0), full_matrices=False)
            U, V, entry["dora"] = U_all[:, : f.rank], Vh[: f.rank].T, "exact"  # S: the whole spectrum
        else:
            S, U, V = lowrank_svd(f.B, f.A, f.scale, vectors=True)
            if f.magnitude is not None:
                entry["dora"] = "direction-only"  # s·B·A alone; pass --base for the exact effective ΔW
        entry.update(singular_values=S.tolist(), **spectrum_metrics(S), suggested_rank=max(1, energy_rank(S, energy)))
        if W0 is not None and tuple(W0.shape) == f.shape:
            entry["base"] = base_metrics(W0, entry["fro_norm"], U, V)
            if intruders is not None:
                delta = dora_delta(f, W0) if f.magnitude is not None else f.scale * (f.B.double() @ f.A.double())
                entry["intruders"] = intruder_dimensions(W0, delta, *intruders, cache=svd_cache)
                entry["intruder_count"] = entry["intruders"]["count"]
        elif W0 is not None:
            skipped.append({"name": f.name, "reason": f"base weight shape {tuple(W0.shape)} != ΔW shape {f.shape}"})
        for label, theirs in others.items():
            g = theirs.get(f.name)
            if g is not None and g.shape != f.shape:
                skipped.append({"name": f.name, "reason": f"--compare {label}: shape {g.shape} != {f.shape} (another base?)"})
            elif g is not None:
                entry.setdefault("phi", {})[label] = subspace_similarity(U, lowrank_svd(g.B, g.A, g.scale, True)[1]).tolist()
        modules.append(entry)
    doc = {
        "schema": 1, "energy_target": energy,
        "adapter": {k: sorted(v) if isinstance(v := config.get(k), set) else v
                    for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
        "modules": modules, "skipped": skipped,
    }
    doc["advice"] = advise(modules, energy)
    counted = [m["intruder_count"] for m in modules if "intruder_count" in m]
    if counted:
        doc["intruders"] = {"k": intruders[0], "eps": intruders[1], "modules": len(counted),
                            "modules_with_intruders": sum(c > 0 for c in counted), "total": sum(counted),
                            "mean_per_module": sum(counted) / len(counted)}
    return doc


def advise(modules: list[dict], energy: float) -> dict:
    """Per-module ranks that keep `energy` of each ΔW, as a peft rank_pattern and as one global r.

    The global r covers 90% of modules (a few outliers should not set everyone's rank); rank_pattern lists
    only the modules whose own rank differs from it.
    """
    if not modules:
        return {}
    ranks = [m["suggested_rank"] for m in modules]
    global_r = int(np.ceil(np.percentile(ranks, 90)))
    pattern = {m["name"]: m["suggested_rank"] for m in modules if m["suggested_rank"] != global_r}
    cost = lambda r, m: r * (m["shape"][0] + m["shape"][1])
    override = f"lora.r={global_r}"
    if pattern:  # `++`: Hydra's typed dicts take new keys only through a forced override
        override += " '++lora.rank_pattern={" + ",".join(f"{k}:{v}" for k, v in pattern.items()) + "}'"
    return {
        "energy_target": energy, "global_r": global_r, "rank_pattern": pattern, "override": override,
        "params_now": sum(cost(m["rank"], m) for m in modules),
        "params_rank_pattern": sum(cost(m["suggested_rank"], m) for m in modules),
        "params_global_r": sum(cost(global_r, m) for m in modules),
        "modules_meeting_target_at_global_r": sum(r <= global_r for r in ranks) / len(ranks),
    }


def write(doc: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """spectrum.json, report.md and (optionally) the PNG plots; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spectrum.json").write_text(json.dumps(doc, indent=1))
    written = [out_dir / "spectrum.json"]
    if plots and doc["modules"]:
        from lorafit.analysis import plots as P

        written += P.all_plots(doc, out_dir)
    (out_dir / "report.md").write_text(markdown(doc, [p.name for p in written if p.suffix == ".png"]))
    return written + [out_dir / "report.md"]


def summary_line(doc: dict) -> str:
    ms, adv = doc["modules"], doc["advice"]
    if not ms:
        return "no adapted modules found"
    ranks = sorted({m["rank"] for m in ms})
    saving = 1 - adv["params_rank_pattern"] / adv["params_now"] if adv["params_now"] else 0.0
    return (f"Across {len(ms)} adapted modules (rank {', '.join(map(str, ranks))}), ΔW has a mean effective rank of "
            f"{mean(m['effective_rank'] for m in ms):.1f}, and {doc['energy_target']:.0%} of its energy lies in the top "
            f"{mean(m['suggested_rank'] for m in ms):.1f} directions on average. A global r={adv['global_r']} keeps that "
            f"much energy in {adv['modules_meeting_target_at_global_r']:.0%} of modules; a per-module rank_pattern keeps it "
            f"in all of them with {saving:.0%} fewer adapter parameters.")


def markdown(doc: dict, images: list[str]) -> str:
    ms, adv = doc["modules"], doc["advice"]
    lines = ["# What the adapter learned", "", summary_line(doc), ""]
    if auto := doc.get("auto_rank"):
        lines += ["## Ranks chosen in the run (lora.r=auto)", "",
                  f"Trained at r={auto['r_max']} until step {auto['step']}, then every ΔW was cut to its exact best "
                  f"approximation holding {auto['energy']:.0%} of its energy ({auto['energy_kept']:.2%} of the total kept; "
                  f"Adam's moments: {auto['moments']}), and training went on at those ranks: "
                  f"{auto['params_before']:,} -> {auto['params_after']:,} LoRA parameters. The ranks below are the "
                  "shipped adapter's.", ""]
    if adv:
        lines += ["## Rank advice", "",
                  f"To keep {adv['energy_target']:.0%} of each ΔW's energy (Eckart–Young: the best rank-k approximation "
                  "keeps the top k singular values):", "", "```", f"python -m lorafit ... {adv['override']}", "```", "",
                  "| adapter | parameters |", "| --- | ---: |", f"| now | {adv['params_now']:,} |",
                  f"| rank_pattern | {adv['params_rank_pattern']:,} |", f"| global r={adv['global_r']} | {adv['params_global_r']:,} |",
                  ""]
    with_base = any("base" in m for m in ms)
    lines += ["## Per module type", "", "| type | modules | rank | eff. rank | r90 | r99 | stable rank | ‖ΔW‖_F |"
              + (" ‖ΔW‖/‖W0‖ | amplification |" if with_base else ""),
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if with_base else "")]
    for t in dict.fromkeys(m["type"] for m in ms):
        g = [m for m in ms if m["type"] == t]
        row = (f"| {t} | {len(g)} | {mean(m['rank'] for m in g):.0f} | {mean(m['effective_rank'] for m in g):.2f} | "
               f"{mean(m['r90'] for m in g):.1f} | {mean(m['r99'] for m in g):.1f} | {mean(m['stable_rank'] for m in g):.2f} | "
               f"{mean(m['fro_norm'] for m in g):.3g} |")
        if with_base:
            row += (f" {mean(m.get('base', {}).get('delta_over_w0') for m in g):.3g} |"
                    f" {mean(m.get('base', {}).get('amplification') for m in g):.3g} |")
        lines.append(row)
    lines += ["", "## Per layer", "", "| module | eff. rank | r90 | r99 | ‖ΔW‖_F | σ₁ | σ₁/σ_r | suggested r |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in ms:
        cond = f"{m['condition']:.3g}" if m["condition"] is not None else "∞"
        lines.append(f"| {m['name']} | {m['effective_rank']:.2f} | {m['r90']} | {m['r99']} | {m['fro_norm']:.3g} | "
                     f"{m['spectral_norm']:.3g} | {cond} | {m['suggested_rank']} |")
    if with_base:
        lines += ["", "With the base weights: ‖UᵀW0V‖_F projects W0 on ΔW's top-r singular directions (LoRA paper §7). "
                  "If it is much smaller than for W0's own top directions and close to random ones, ΔW amplifies directions "
                  "W0 does not emphasise; *amplification* = ‖ΔW‖_F / ‖UᵀW0V‖_F."]
    if doc.get("intruders"):
        it = doc["intruders"]
        lines += ["", "## Intruder dimensions", "",
                  f"{it['modules_with_intruders']} of {it['modules']} modules have intruder dimensions ({it['total']} in all, "
                  f"{it['mean_per_module']:.2f} per module): among the top {it['k']} left singular vectors of W0 + ΔW, "
                  f"directions whose |cos| with every singular vector of W0 stays below {it['eps']} (Shuttleworth et al. "
                  "2024: LoRA adds them, full fine-tuning mostly does not, and they go with forgetting). "
                  "`python -m lorafit.shrink --intruders LAMBDA` dampens them through peft.", "",
                  "| module | intruders | at positions | their σ | max cos of the top k |", "| --- | ---: | --- | --- | --- |"]
        for m in ms:
            if m.get("intruder_count"):
                i = m["intruders"]
                lines.append(f"| {m['name']} | {i['count']} | {i['positions']} | {', '.join(f'{x:.3g}' for x in i['sigma'])} | "
                             f"{', '.join(f'{c:.2f}' for c in i['max_cos'])} |")
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['name']}: {s['reason']}" for s in doc["skipped"]]
    if any("phi" in m for m in ms):
        lines += ["", "## Subspace similarity", "",
                  "φ(i, j) = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j) between the top-i left singular vectors of this ΔW and the top-j of "
                  "the other adapter's: 1 when one subspace contains the other, about max(i, j)/d for random ones.", "",
                  "| module | other | φ(1,1) | φ(k,k), k = min rank |", "| --- | --- | ---: | ---: |"]
        for m in ms:
            for label, phi in m.get("phi", {}).items():
                k = min(len(phi), len(phi[0]))
                lines.append(f"| {m['name']} | {label} | {phi[0][0]:.3f} | {phi[k - 1][k - 1]:.3f} |")
    lines += ["", "## How to read this", "",
              "- *effective rank*: exp of the entropy of σᵢ²/Σσ²: how many directions ΔW really uses (1 to r).",
              "- *r90 / r99*: how many top singular directions hold 90% / 99% of ‖ΔW‖²_F; a rank beyond them buys little.",
              "- *stable rank*: ‖ΔW‖²_F / ‖ΔW‖²_2, a noise-robust lower bound on the rank.",
              "- *σ₁/σ_r*: near 1, every rank-1 direction is used; large, the last directions are near-empty.", ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"
