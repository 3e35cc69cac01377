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


def quiet_libraries() -> None:
    """Keep the terminal for lorafit's own output: libraries show errors only, and warnings that concern the run
    (truncation, bad data) come from lorafit's own logger. Every CLI's main() calls this first."""
    import logging
    import os
    import re
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()  # e.g. a seq_cls load report: "classifier.weight | MISSING"
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    # datasets' bars (generating splits, map, filter) fill a run's first screen. The env var, read when datasets is
    # imported, has priority over code in datasets: a user's own HF_DATASETS_DISABLE_PROGRESS_BARS=0 still wins.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # imported already: the env var was read before we set it
        sys.modules["datasets"].disable_progress_bars()
    for name in ("accelerate", "DeepSpeed", "compilers"):  # a line per checkpoint file; DeepSpeed's op builds
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed's logger warns "Setting accelerator to CPU" whenever accelerate asks it for the accelerator on a
    # GPU-less machine (lorafit knows where it runs). DeepSpeed resets its logger's level when imported, but keeps
    # its filters, so this holds whether or not it is imported yet.
    logging.getLogger("DeepSpeed").addFilter(_not_cpu_accelerator_notice)  # one function: added once, however often
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # int8 warns on every matmul
    # At import: an optional fused 4-bit CPU kernel lorafit never runs (models.one_4bit_compute_path), and "Failed
    # to load CPU gemm_4bit_forward from kernels-community" where the `kernels` package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft 0.21 calls transformers 5's deprecated name on every get_peft_model / PeftModel.from_pretrained.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    # peft 0.21 maps all-linear on a transformers-5 MoE to the fused expert tensors, with rank and alpha 2r, 2·alpha
    # for gate_up_proj (two projections in one), then warns that its own pattern matches no *module*: it matches the
    # parameter, as intended (tests/test_families.py checks every expert's ΔW against peft's). So do lora.r_expert's.
    from lorafit.adapters import EXPERT_FUSED, EXPERT_OTHER, PEFT_FUSED

    keys = "|".join(re.escape(repr(k)) for k in (EXPERT_FUSED, EXPERT_OTHER, PEFT_FUSED))
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=r"The following (rank|alpha)_pattern keys did "
                            rf"not match any targeted module and were ignored: \[(({keys})(, )?)+\]")
    # ... and where lora.target_parameters matches nothing, config validation says so in one line (adapters.check_targets)
    warnings.filterwarnings("ignore", message=r"target_parameters=.* were set but no parameter was matched",
                            category=RuntimeWarning)


def _not_cpu_accelerator_notice(record) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()
