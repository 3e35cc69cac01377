"""What every lorafit module may raise or write safely, and imports nothing of lorafit's: a leaf of the import graph."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (a bad key, value, file or column). Printed as one line, without a traceback."""


def debug_enabled() -> bool:
    return os.environ.get("LORAFIT_DEBUG", "") not in ("", "0")


# Each kind of output lorafit writes, by the file its writer leaves in it: the one explicit sign that a folder is a
# lorafit output of that kind and may be replaced by a new one. Checked in this order (a shrunk adapter also carries
# the lorafit.json of the run's adapter it came from).
OUTPUT_MARKERS = {"merged": "merge_report.json", "shrunk": "shrink_report.json", "dampened": "intruder_report.json",
                  "compressed": "lowrank.json", "adapter": "lorafit.json"}


def output_kind(path: Path) -> str | None:
    """The kind of lorafit output in `path` (a key of OUTPUT_MARKERS), or None."""
    return next((kind for kind, marker in OUTPUT_MARKERS.items() if (path / marker).is_file()), None)


def check_output(out: Path, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out") -> Path:
    """`out` resolved, if a `kind` output may be written there; else a UserError naming `flag` and the fix.

    Never the working directory or a folder above it, nor an input or a folder holding one (`inputs`: what the
    writer reads, which replacing `out` would delete), even with `overwrite`. Otherwise: a missing or empty folder,
    or a lorafit output of the same kind (a previous merge, a resumed run's adapter), is replaced; anything else
    only with `overwrite`."""
    where = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise UserError(f"{flag} {out}: is the working directory or a folder above it; name a new folder")
    for src in inputs:
        src = Path(src).resolve()
        if where == src or where in src.parents:
            raise UserError(f"{flag} {out}: {'is' if where == src else 'contains'} the input {src}; name a new folder")
    if overwrite or not where.exists() or output_kind(where) == kind or (where.is_dir() and not any(where.iterdir())):
        return where
    found = output_kind(where) if where.is_dir() else None
    what = ("is a file" if not where.is_dir() else f"holds a lorafit {found} output, not a {kind} one" if found else
            f"is not empty and holds no earlier {kind} output (no {OUTPUT_MARKERS[kind]})")
    fix = "pass --overwrite to replace it, or name a new folder" if flag.startswith("--") else f"point {flag} at a new folder"
    raise UserError(f"{flag} {out}: {what}; {fix}")


@contextmanager
def atomic_dir(out: Path, kind: str, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Write into a hidden temp dir beside `out` that replaces it whole on success, after check_output allows it.

    The old `out` is moved aside, the new one renamed in, and only then the old one deleted: a crash leaves the old
    one whole (possibly under its .old name) or the new one. A failure inside the block leaves `out` untouched and
    removes the temp dir."""
    out = check_output(out, kind, inputs, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = lambda suffix: out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.{suffix}")  # a fresh name: deletes nothing
    tmp = aside("tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = aside("old") if out.exists() or out.is_symlink() else None
    if old is not None:
        os.replace(out, old)  # atomic on one filesystem, as is the rename below
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
