"""What every lorafit module may raise or write safely, and imports nothing of lorafit's: a leaf of the import graph."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (a bad key, value, file or column). Printed as one line, without a traceback."""


def debug_enabled() -> bool:
    return os.environ.get("LORAFIT_DEBUG", "") not in ("", "0")


@contextmanager
def atomic_dir(out: Path):
    """Write into a hidden sibling temp dir that replaces `out` whole on success: a crash leaves the old one or none."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic on one filesystem
