"""PNG plots of a spectrum document: where a person would rather look than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plt_agg():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, tight: bool = True) -> Path:
    """Write a figure as PNG and free it."""
    plt = plt_agg()
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_type(doc: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for m in doc["modules"]:
        groups.setdefault(m["type"], []).append(m)
    return groups


def _padded(rows: list[list[float]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [np.nan] * (width - len(r)) for r in rows])


def decay(doc: dict, path: Path) -> Path:
    """Normalized singular values σᵢ/σ₁ per module type: median over layers, with the min-max band."""
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, ms in _by_type(doc).items():
        s = _padded([(np.array(m["singular_values"]) / max(m["singular_values"][0], 1e-30)).tolist() for m in ms])
        i = np.arange(1, s.shape[1] + 1)
        ax.plot(i, np.nanmedian(s, 0), marker="o", ms=3, label=f"{t} ({len(ms)})")
        ax.fill_between(i, np.nanmin(s, 0), np.nanmax(s, 0), alpha=0.15)
    ax.set(xlabel="singular value index i", ylabel="σᵢ / σ₁", yscale="log", title="Spectrum of ΔW = s·B·A")
    ax.axhline(0.1, color="grey", ls=":", lw=1)
    ax.legend(fontsize=8)
    return save(fig, path)


def energy(doc: dict, path: Path) -> Path:
    """Cumulative energy Σ_{i≤k}σᵢ²/Σσ² per module type, with the 90% and 99% lines."""
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, ms in _by_type(doc).items():
        e = _padded([(np.cumsum(np.square(m["singular_values"])) / max(np.square(m["singular_values"]).sum(), 1e-30)).tolist()
                     for m in ms])
        ax.plot(np.arange(1, e.shape[1] + 1), np.nanmedian(e, 0), marker="o", ms=3, label=t)
    for level in (0.9, 0.99):
        ax.axhline(level, color="grey", ls="--", lw=1)
        ax.text(1, level, f" {level:.0%}", va="bottom", fontsize=8, color="grey")
    ax.set(xlabel="rank k", ylabel="energy kept by the top k", ylim=(0, 1.02), title="Cumulative energy of ΔW (median over layers)")
    ax.legend(fontsize=8)
    return save(fig, path)


def heatmap(doc: dict, path: Path, key: str = "effective_rank") -> Path | None:
    """Layer × module type grid of one metric."""
    ms = [m for m in doc["modules"] if m["layer"] is not None]
    if not ms:
        return None
    plt = plt_agg()
    types, layers = list(dict.fromkeys(m["type"] for m in ms)), sorted({m["layer"] for m in ms})
    grid = np.full((len(layers), len(types)), np.nan)
    for m in ms:
        grid[layers.index(m["layer"]), types.index(m["type"])] = m.get(key, np.nan)  # experts: no W0 metrics
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.2 + 0.28 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set(xticks=range(len(types)), xticklabels=types, yticks=range(len(layers)), yticklabels=layers, ylabel="layer",
           title=key.replace("_", " "))
    if grid.size <= 200:
        for (r, c), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(c, r, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    return save(fig, path)


def phi(doc: dict, out_dir: Path) -> list[Path]:
    """φ(i, j) per compared adapter: one panel per module type, averaged over layers (as the LoRA paper's Fig. 3)."""
    plt, paths = plt_agg(), []
    labels = list(dict.fromkeys(l for m in doc["modules"] for l in m.get("phi", {})))
    for label in labels:
        groups = {t: [np.array(m["phi"][label]) for m in ms if label in m.get("phi", {})] for t, ms in _by_type(doc).items()}
        groups = {t: g for t, g in groups.items() if g}
        fig, axes = plt.subplots(1, len(groups), figsize=(1 + 3.2 * len(groups), 3.6), squeeze=False, layout="constrained")
        for ax, (t, mats) in zip(axes[0], groups.items()):
            im = ax.imshow(np.mean(mats, 0), vmin=0, vmax=1, cmap="magma", origin="lower", aspect="auto",
                           extent=(0.5, mats[0].shape[1] + 0.5, 0.5, mats[0].shape[0] + 0.5))
            ax.set(title=t, xlabel=f"j ({label})", ylabel="i (this adapter)")
        fig.colorbar(im, ax=axes[0].tolist())
        fig.suptitle(f"subspace similarity φ(i, j) vs {label}")
        path = out_dir / f"phi_{''.join(c if c.isalnum() else '_' for c in label)}.png"
        paths.append(save(fig, path, tight=False))  # constrained layout already
    return paths


def intruder_profile(doc: dict, path: Path) -> Path | None:
    """Max |cos| of each of the top-k singular vectors of W0 + ΔW against W0's (median and range over modules):
    below the eps line a direction is an intruder."""
    ms = [m for m in doc["modules"] if "intruders" in m]
    if not ms:
        return None
    plt = plt_agg()
    cos = _padded([m["intruders"]["max_cos"] for m in ms])
    x = np.arange(1, cos.shape[1] + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.fill_between(x, np.nanmin(cos, 0), np.nanmax(cos, 0), alpha=0.25, label="min-max over modules")
    ax.plot(x, np.nanmedian(cos, 0), marker="o", ms=3, label="median")
    ax.axhline(doc["intruders"]["eps"], color="red", ls="--", lw=1, label=f"eps = {doc['intruders']['eps']}")
    ax.set(xlabel="singular vector i of W0 + ΔW", ylabel="max |cos| with W0's", ylim=(0, 1.02),
           title=f"Intruder dimensions: {doc['intruders']['total']} in {doc['intruders']['modules']} modules")
    ax.legend(fontsize=8)
    return save(fig, path)


def all_plots(doc: dict, out_dir: Path) -> list[Path]:
    paths = [decay(doc, out_dir / "singular_values.png"), energy(doc, out_dir / "cumulative_energy.png"),
             heatmap(doc, out_dir / "effective_rank.png"), intruder_profile(doc, out_dir / "intruders.png")]
    if doc.get("intruders"):
        paths.append(heatmap(doc, out_dir / "intruder_count.png", key="intruder_count"))
    return [p for p in paths if p is not None] + phi(doc, out_dir)
