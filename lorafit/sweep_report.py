"""`python -m lorafit.sweep_report SWEEP_DIR [--tolerance 0.005]`: one report that answers "which rank?".

Runs by itself after every multirun (a Hydra callback, conf/config.yaml) and on demand. It reads each job's
run dir (summary.json, config.yaml, analysis/spectrum.json, adapter/) and writes to the sweep dir:
  sweep.json             the jobs, their overrides, run dirs and status
  report.md              the recommended rank, a row per run, and the plots below
  metric_vs_rank.png     eval metric against r (mean ± std over seeds), full fine-tuning as a line
  params_vs_rank.png     trainable parameters against r, and metric per million trainable parameters
  spectrum_vs_rank.png   effective rank and r90 of ΔW against r, per module type
  phi_vs_largest.png     subspace similarity of each rank's ΔW with the largest rank's, per module type and layer
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from hydra.experimental.callback import Callback

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.metrics import higher_is_better, mean


class SweepCallback(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            out = write_report(sweep_dir)
            print(f"sweep report: {out}")


def collect(sweep_dir: Path) -> list[dict]:
    """One entry per job dir under the sweep (a dir with Hydra's .hydra/overrides.yaml)."""
    import yaml

    runs = []
    for overrides in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        run_dir = overrides.parent.parent
        job = {"run_dir": str(run_dir), "overrides": yaml.safe_load(overrides.read_text()) or [], "status": "failed"}
        if (run_dir / "summary.json").is_file():
            s = json.loads((run_dir / "summary.json").read_text())
            job.update(status="done", method=s.get("method", "lora"), r=s.get("lora_r"), seed=s.get("seed"),
                       metric_name=s["primary_metric"], metric=s["eval"].get(s["primary_metric"]),
                       trainable_params=s["trainable_params"], wall_s=s.get("wall_s"), samples_per_s=s.get("samples_per_s"))
        runs.append(job)
    _settings(runs)
    return runs


def finished(runs: list[dict], method: str = "lora") -> list[dict]:
    return [r for r in runs if r["status"] == "done" and r.get("method") == method]


RANK_KEYS = ("lora.r", "train.seed")  # what a rank sweep varies within one setting; every other override is the setting


def _settings(runs: list[dict]) -> None:
    """Each job's setting: its overrides other than rank and seed that not every job shares, e.g. "train.lr=0.001".
    Runs that differ in them are not repeats of one another (a sweep over lr or alpha must not average them as if
    they were seeds)."""
    common = set.intersection(*(set(j["overrides"]) for j in runs)) if runs else set()
    for j in runs:
        j["setting"] = " ".join(sorted(o for o in j["overrides"]
                                       if o not in common and o.split("=", 1)[0].lstrip("+~") not in RANK_KEYS))


def setting(job: dict) -> str:
    return job.get("setting", "")


def recommend(runs: list[dict], tolerance: float) -> dict:
    """The smallest r whose mean metric over seeds, in some setting of the other swept keys, is within `tolerance` of
    the best (setting, r) mean (relative for perplexity/loss); with the setting that reaches it."""
    lora = finished(runs)
    if not lora:
        return {}
    name = lora[0]["metric_name"]
    higher = higher_is_better(name)
    by = {}  # {setting: {r: mean over seeds}}
    for s in sorted({setting(x) for x in lora}):
        mine = [x for x in lora if setting(x) == s]
        by[s] = {r: mean([x["metric"] for x in mine if x["r"] == r]) for r in sorted({x["r"] for x in mine})}
    pick = max if higher else min
    best = pick(m for means in by.values() for m in means.values())
    slack = tolerance if higher else tolerance * best
    ok = [(r, m, s) for s, means in by.items() for r, m in means.items() if (m >= best - slack if higher else m <= best + slack)]
    r_rec = min(r for r, _, _ in ok)
    chosen = pick([x for x in ok if x[0] == r_rec], key=lambda x: x[1])[2]
    return {"metric": name, "best": best, "tolerance": slack, "recommended_r": r_rec, "setting": chosen,
            "means": by[chosen], "settings": by}


def _std(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def spectra(runs: list[dict]) -> dict:
    """{r: {module type: (mean effective rank, mean r90)}} from each lora run's analysis/spectrum.json."""
    out = {}
    for run in finished(runs):
        path = Path(run["run_dir"]) / "analysis" / "spectrum.json"
        if not path.is_file():
            continue
        mods = json.loads(path.read_text())["modules"]
        for t in dict.fromkeys(m["type"] for m in mods):
            g = [m for m in mods if m["type"] == t]
            out.setdefault(run["r"], {}).setdefault(t, []).append(
                (mean([m["effective_rank"] for m in g]), mean([m["r90"] for m in g])))
    return {r: {t: tuple(mean(v[i] for v in vals) for i in (0, 1)) for t, vals in ts.items()} for r, ts in out.items()}


def phi_vs_largest(runs: list[dict]) -> dict:
    """{r: {module name: (φ(1,1), φ(r, R))}} between each rank's ΔW and the largest rank R's (same seed if any).

    φ(r, R) = ‖U_rᵀU_R‖²_F / r is the share of the rank-r update's column space inside the rank-R one's: the LoRA
    paper's Fig. 3 question (do the top directions of a small adapter live in a big one's?), for every layer.
    """
    from lorafit.analysis.spectrum import lora_factors, lowrank_svd, read_adapter, subspace_similarity

    lora = [r for r in finished(runs) if (Path(r["run_dir"]) / "adapter").is_dir()]
    if len({r["r"] for r in lora}) < 2:
        return {}
    R = max(r["r"] for r in lora)
    vectors = {}

    def left(run):
        key = run["run_dir"]
        if key not in vectors:
            factors, _ = lora_factors(*read_adapter(run["run_dir"]))
            vectors[key] = {f.name: lowrank_svd(f.B, f.A, f.scale, vectors=True)[1] for f in factors}
        return vectors[key]

    out = {}
    for run in lora:
        ref = next((x for x in lora if x["r"] == R and x["seed"] == run["seed"]), next(x for x in lora if x["r"] == R))
        if run is ref:
            continue
        mine, theirs = left(run), left(ref)
        for name in mine.keys() & theirs.keys():
            phi = subspace_similarity(mine[name], theirs[name])
            out.setdefault(run["r"], {}).setdefault(name, []).append((float(phi[0, 0]), float(phi[-1, -1])))
    return {r: {n: tuple(mean(v[i] for v in vals) for i in (0, 1)) for n, vals in mods.items()} for r, mods in out.items()}


def write_report(sweep_dir: Path, tolerance: float = 0.005) -> Path:
    from lorafit.errors import UserError

    runs = collect(sweep_dir)
    if not runs:
        raise UserError(f"{sweep_dir}: no job dirs (with .hydra/overrides.yaml) found; is it a multirun sweep dir?")
    (sweep_dir / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep_dir), "jobs": runs}, indent=1))
    rec, spec, phi = recommend(runs, tolerance), spectra(runs), phi_vs_largest(runs)
    advisor = _advisor(runs)
    images = _plots(runs, rec, spec, phi, sweep_dir) if rec else []
    (sweep_dir / "report.md").write_text(_markdown(runs, rec, spec, phi, advisor, images))
    return sweep_dir / "report.md"


def _advisor(runs) -> dict | None:
    """The spectrum advisor's global r, read from the largest-rank run's analysis (the rank it saw the job use)."""
    lora = finished(runs)
    for run in sorted(lora, key=lambda r: -r["r"]):
        path = Path(run["run_dir"]) / "analysis" / "spectrum.json"
        if path.is_file():
            advice = json.loads(path.read_text()).get("advice", {})
            return {"from_r": run["r"], "global_r": advice.get("global_r"), "energy": advice.get("energy_target")}
    return None


def _plots(runs, rec, spec, phi, out: Path) -> list[str]:
    import numpy as np

    from lorafit.analysis.plots import plt_agg, save as save_figure

    plt = plt_agg()

    lora = finished(runs)
    full = finished(runs, "full")
    ranks = sorted({r["r"] for r in lora})
    name, images = rec["metric"], []
    by_r = {r: [x for x in lora if x["r"] == r] for r in ranks}

    def save(fig, filename: str, tight: bool = True) -> None:
        images.append(save_figure(fig, out / filename, tight).name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in rec["settings"]:  # one line per setting of the other swept keys: never averaged across them
        rs = sorted(rec["settings"][s])
        xs = [[x["metric"] for x in by_r[r] if setting(x) == s] for r in rs]
        ax.errorbar(rs, [mean(v) for v in xs], yerr=[_std(v) for v in xs], marker="o", capsize=3,
                    label=f"LoRA {s} (mean ± std over seeds)".replace("LoRA  (", "LoRA ("))
    means = [mean([x["metric"] for x in by_r[r]]) for r in ranks]
    if full:
        m = mean([x["metric"] for x in full])
        ax.axhline(m, color="k", ls="--", lw=1, label=f"full fine-tuning ({m:.4f})")
    ax.axvline(rec["recommended_r"], color="tab:green", ls=":", label=f"recommended r={rec['recommended_r']}")
    ax.set(xscale="log", xlabel="LoRA rank r", ylabel=f"eval {name}", title=f"{name} against rank")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()  # a log axis would label 6×10^0 between the ranks
    ax.legend(fontsize=8)
    save(fig, "metric_vs_rank.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    params = [mean([x["trainable_params"] for x in by_r[r]]) for r in ranks]
    a1.plot(ranks, params, marker="o")
    a1.set(xscale="log", yscale="log", xlabel="r", ylabel="trainable parameters", title="trainable parameters")
    a2.plot(ranks, [m / (p / 1e6) for m, p in zip(means, params)], marker="o", color="tab:orange")
    a2.set(xscale="log", yscale="log", xlabel="r", ylabel=f"{name} per million trainable params", title="metric per parameter")
    for a in (a1, a2):
        a.set_xticks(ranks, [str(r) for r in ranks])
    save(fig, "params_vs_rank.png")

    if spec:
        fig, ax = plt.subplots(figsize=(6, 4))
        rs = sorted(spec)
        for t in dict.fromkeys(t for r in rs for t in spec[r]):
            ax.plot(rs, [spec[r].get(t, (np.nan,))[0] for r in rs], marker="o", label=f"{t}: effective rank")
            ax.plot(rs, [spec[r].get(t, (np.nan, np.nan))[1] for r in rs], marker="s", ls="--", label=f"{t}: r90")
        ax.plot(rs, rs, color="grey", lw=0.8, label="y = r")
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank r", ylabel="rank of ΔW", title="how much of its rank ΔW uses")
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.legend(fontsize=7)
        save(fig, "spectrum_vs_rank.png")

    if phi:
        from lorafit.analysis.spectrum import layer_index, module_type

        rs = sorted(phi)
        names = sorted({n for r in rs for n in phi[r]})
        types = list(dict.fromkeys(module_type(n) for n in names))
        layers = sorted({layer_index(n) for n in names if layer_index(n) is not None}) or [None]
        fig, axes = plt.subplots(1, len(types), figsize=(1 + 3.4 * len(types), 3.4), squeeze=False, layout="constrained")
        for ax, t in zip(axes[0], types):
            grid = np.full((len(rs), len(layers)), np.nan)
            for n in names:
                if module_type(n) == t:
                    for i, r in enumerate(rs):
                        if n in phi[r]:
                            grid[i, layers.index(layer_index(n))] = phi[r][n][1]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto", origin="lower")
            ax.set(title=t, xlabel="layer", ylabel="rank r", yticks=range(len(rs)), yticklabels=rs,
                   xticks=range(len(layers)), xticklabels=layers)
        fig.colorbar(im, ax=axes[0].tolist(), label=f"φ(r, R={max(r['r'] for r in lora)})")
        save(fig, "phi_vs_largest.png", tight=False)  # constrained layout already
    return images


def _markdown(runs, rec, spec, phi, advisor, images) -> str:
    lines = ["# Rank sweep", ""]
    if rec:
        many = len(rec["settings"]) > 1
        lines += [f"**Recommended rank: r={rec['recommended_r']}**" + (f" (with {rec['setting']})" if many else "") +
                  f", the smallest whose mean eval {rec['metric']} over seeds is within {rec['tolerance']:.4g} of the "
                  f"best ({rec['best']:.4f})" + (f"; runs are grouped by their other overrides ({len(rec['settings'])} "
                                                 "settings), never averaged across them." if many else ".")]
        if advisor and advisor.get("global_r"):
            g = advisor["global_r"]
            at_g = rec["means"].get(g)
            lines += [f"The spectrum advisor, reading the r={advisor['from_r']} adapter, suggests r={g} to keep "
                      f"{advisor['energy']:.0%} of ΔW's energy" + (f"; the sweep measured {at_g:.4f} at r={g}." if at_g is not None
                                                                     else ".")]
        lines.append("")
    lines += ["| run | method | setting | r | seed | metric | trainable params | wall s | samples/s |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(runs, key=lambda x: (x.get("method") != "lora", setting(x), x.get("r") or 0, x.get("seed") or 0)):
        if r["status"] != "done":
            lines.append(f"| {Path(r['run_dir']).name} | failed | {setting(r)} | | | | | | |")
            continue
        lines.append(f"| {Path(r['run_dir']).name} | {r['method']} | {setting(r)} | {r['r'] if r['r'] is not None else '-'} | {r['seed']} | "
                     f"{r['metric']:.4f} | {r['trainable_params']:,} | {r['wall_s']:.0f} | {r['samples_per_s']:.1f} |")
    if spec:
        lines += ["", "## ΔW spectrum by rank", "", "| r | module type | effective rank | r90 |", "| ---: | --- | ---: | ---: |"]
        lines += [f"| {r} | {t} | {v[0]:.2f} | {v[1]:.1f} |" for r in sorted(spec) for t, v in spec[r].items()]
    if phi:
        from lorafit.analysis.spectrum import module_type

        lines += ["", "## Subspace similarity with the largest rank", "",
                  "φ(1,1): overlap of the top singular direction; φ(r, R): share of the rank-r subspace inside the rank-R one "
                  "(≈ r/d for unrelated subspaces).", "", "| r | module type | mean φ(1,1) | mean φ(r, R) |", "| ---: | --- | ---: | ---: |"]
        for r in sorted(phi):
            for t in dict.fromkeys(module_type(n) for n in phi[r]):
                vals = [v for n, v in phi[r].items() if module_type(n) == t]
                lines.append(f"| {r} | {t} | {mean([v[0] for v in vals]):.3f} | {mean([v[1] for v in vals]):.3f} |")
    lines += [""] + [f"![{i}]({i})" for i in images]
    return "\n".join(lines) + "\n"


@user_errors_as_one_line
def main(argv=None) -> Path:
    quiet_libraries()
    p = argparse.ArgumentParser(prog="python -m lorafit.sweep_report", description="Summarize a rank sweep.")
    p.add_argument("sweep_dir")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="how close to the best a rank must be (metric units; relative for perplexity/loss). Default 0.005")
    args = p.parse_args(argv)
    from lorafit.errors import UserError

    if not Path(args.sweep_dir).is_dir():
        raise UserError(f"{args.sweep_dir}: no such sweep dir")
    out = write_report(Path(args.sweep_dir), args.tolerance)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
