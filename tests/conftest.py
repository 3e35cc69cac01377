"""Shared test helpers: offline hub, composed configs, in-process runs and real CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id fails fast instead of hanging
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

# rouge-score imports absl.logging, whose handler keeps the sys.stderr of the moment it was made (here pytest's
# capture stream) and closes it when Hydra's in-process logging setup closes all handlers: later tests then fail on
# a closed file. Point it at the real stderr, which absl never closes.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
KEYWORDS = {"sport": "match goal striker", "business": "market shares bank", "tech": "software chip phone"}


def _write_keyword_csvs(root: Path) -> tuple[Path, Path]:
    """A 3-topic task a tiny random model learns in a few dozen steps: the topic's keywords are in the text."""
    import csv
    import random

    rng, paths = random.Random(0), []
    filler = "the a of and to in is was for on with as by at from this that".split()
    for name, n in (("train.csv", 240), ("dev.csv", 48)):
        paths.append(root / name)
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                topic = list(KEYWORDS)[i % 3]
                words = rng.sample(filler, 8) + KEYWORDS[topic].split()
                rng.shuffle(words)
                w.writerow([" ".join(words), topic])
    return tuple(paths)


_DATA_ROOT = Path(__file__).resolve().parent / ".data"
_DATA_ROOT.mkdir(exist_ok=True)
CLS_TRAIN, CLS_EVAL = _write_keyword_csvs(_DATA_ROOT)
# Tiny runs check exactness (merges, resume, accumulation): fp32 on every CPU, whatever `auto` would pick here, and
# r=8/alpha=16, the settings their step counts and learning rates were tuned with (the bbc_news default is r=16 now).
TINY_CLS = ["model=tiny-bert", "train.mixed_precision=no", "lora.r=8", "lora.alpha=16", "data=files", f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}", "data.max_length=64", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=0", "train.lr=5e-2"]
TINY_LM = ["model=tiny-llama", "train.mixed_precision=no", "lora.r=8", "lora.alpha=16", "data=files", f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}", "data.max_length=64", "train.batch_size=4", "train.log_every=1",
           "train.eval_every=0", "lora.target_modules=all-linear", "train.lr=3e-2", "train.eval_batch_size=16"]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lorafit.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_inprocess(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """Run one job in this process (no interpreter start-up); return (run_dir, summary)."""
    from lorafit.run import run

    run_dir = tmp_path / "run"
    run(compose(*overrides), run_dir=run_dir)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m lorafit ARGS` exactly as a user types it."""
    return subprocess.run([sys.executable, "-m", "lorafit", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def cli_run_dir(tmp_path_factory, *args: str) -> Path:
    """A fresh run dir holding a finished `python -m lorafit ARGS` run (for module-scoped reference runs)."""
    run_dir = tmp_path_factory.mktemp("full")
    out = run_cli(*args, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """One process, many in-process runs: each may choose its own mixed precision (accelerate keeps a singleton)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write
