"""Turn an adapter into `analysis/spectrum.json` (schema below), `report.md` and plots.

spectrum.json:
  {"schema": 1, "energy_target": 0.9, "adapter": {r, alpha, use_rslora, use_dora, target_modules},
   "modules": [{"name", "type", "layer", "kind", "shape": [d_out, d_in], "rank", "scale",
                "singular_values": [...], "fro_norm", "spectral_norm", "r90", "r95", "r99",
                "effective_rank", "stable_rank", "elbow_rank", "condition", "suggested_rank"}, ...],
   "skipped": [{"name", "reason"}], "advice": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.analysis.spectrum import (energy_rank, layer_index, lora_factors, lowrank_svd, module_type,
                                       spectrum_metrics)


def analyze(config: dict, state: dict, energy: float = 0.9) -> dict:
    """The spectrum document for one adapter (config + state dict), computed from r×r cores."""
    factors, skipped = lora_factors(config, state)
    modules = []
    for f in factors:
        sigma = lowrank_svd(f.B, f.A, f.scale)
        modules.append({
            "name": f.name, "type": module_type(f.name), "layer": layer_index(f.name), "kind": f.kind,
            "shape": list(f.shape), "rank": f.rank, "scale": f.scale, "singular_values": sigma.tolist(),
            **spectrum_metrics(sigma), "suggested_rank": max(1, energy_rank(sigma, energy)),
        })
    return {
        "schema": 1, "energy_target": energy,
        "adapter": {k: sorted(v) if isinstance(v := config.get(k), set) else v
                    for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")},
        "modules": modules, "skipped": skipped,
    }


def write(doc: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "spectrum.json"
    path.write_text(json.dumps(doc, indent=1))
    return path
