"""`python -m lorafit.analyze PATH [--base MODEL] [--compare OTHER ...] [--out DIR]`

PATH is a lorafit run dir or any PEFT adapter dir (adapter_config.json + adapter_model.safetensors), so this
works on adapters lorafit did not train. Writes spectrum.json, report.md and PNG plots to DIR (default
PATH/analysis for a run dir, else PATH/../analysis-<name>) and prints the plain-language summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorafit.cli import quiet_libraries, user_errors_as_one_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lorafit.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a lorafit run dir or a PEFT adapter dir")
    p.add_argument("--base", help="base model (alias, local dir or hub id) for W0-aware metrics and exact DoRA")
    p.add_argument("--compare", nargs="+", default=[], metavar="ADAPTER", help="adapters to compare subspaces with (φ)")
    p.add_argument("--out", help="output dir")
    p.add_argument("--energy", type=float, default=0.9, help="energy target of the rank advisor (default 0.9)")
    p.add_argument("--intruder-k", type=int, default=10, help="with --base: top-k directions checked for intruders (10)")
    p.add_argument("--intruder-eps", type=float, default=0.5, help="with --base: |cos| below which one is an intruder (0.5)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (a pickle: only if you trust it)")
    return p.parse_args(argv)


def compare_labels(paths: list[str]) -> list[str]:
    """One distinct label per --compare path: its last folder name (a run dir's, for RUN/adapter), with as many
    parent names before it (joined by "-", as labels name files) as it takes to tell the paths apart, so that
    multirun/A/0/adapter and multirun/B/0/adapter are A-0 and B-0, not both 0 with one of them dropped."""
    parts = [Path(p).resolve().parts[1:] for p in paths]  # without the root "/"
    parts = [p[:-1] if p[-1:] == ("adapter",) and len(p) > 1 else p for p in parts]
    for n in range(1, max(map(len, parts), default=0) + 1):
        labels = ["-".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p[-1]}-{i}" for i, p in enumerate(parts)]  # the same adapter given more than once


@user_errors_as_one_line
def main(argv=None) -> Path:
    quiet_libraries()
    from lorafit.analysis import base as base_weights
    from lorafit.analysis.report import analyze, summary_line, write
    from lorafit.analysis.spectrum import read_adapter
    from lorafit.errors import UserError
    from lorafit.models import cache_dir

    args = parse_args(argv)
    if not 0 < args.energy <= 1:
        raise UserError(f"--energy={args.energy} must be in (0, 1]")
    if args.intruder_k < 1 or not 0 < args.intruder_eps < 1:
        raise UserError(f"--intruder-k={args.intruder_k} must be >= 1 and --intruder-eps={args.intruder_eps} in (0, 1)")
    path = Path(args.path)
    config, state = read_adapter(path, allow_pickle=args.allow_pickle)
    compare = {label: read_adapter(other, allow_pickle=args.allow_pickle)
               for label, other in zip(compare_labels(args.compare), args.compare)}
    base = base_weights.from_dir(args.base, config.get("fan_in_fan_out", False)) if args.base else None
    doc = analyze(config, state, args.energy, base=base, compare=compare, intruders=(args.intruder_k, args.intruder_eps),
                  svd_cache=cache_dir() / "base_svd")  # W0's singular vectors, reused for every adapter on this base
    out = Path(args.out) if args.out else (path / "analysis" if (path / "adapter").is_dir() else path.parent / f"analysis-{path.name}")
    files = write(doc, out, plots=not args.no_plots)
    print(summary_line(doc))
    if doc["advice"]:
        print(f"advice: {doc['advice']['override']}")
    if doc.get("intruders"):
        it = doc["intruders"]
        print(f"intruder dimensions: {it['total']} in {it['modules_with_intruders']} of {it['modules']} modules "
              f"(top {it['k']}, |cos| < {it['eps']})")
    print(f"wrote {len(files)} files to {out}")
    return out


if __name__ == "__main__":
    main()
