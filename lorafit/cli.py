"""How every lorafit entry point reports a user error: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys

from lorafit.errors import UserError, debug_enabled


def user_errors_as_one_line(fn):
    """Turn UserError (and a missing file) into `lorafit: error: ...`; LORAFIT_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError) as e:
            if debug_enabled():
                raise
            # SystemExit is not an Exception, so Hydra lets it through instead of printing its own trace.
            print(f"lorafit: error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
