"""Crashes and bad input: SIGKILL anywhere resumes bitwise; every bad key or file gets one clear line."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLS_EVAL, CLS_TRAIN, TINY_CLS, cli_run_dir, metrics_lines, run_cli, run_inprocess
from safetensors.torch import load_file

RESUMABLE = [*TINY_CLS, "train.max_steps=10", "train.save_every=2", "train.keep_checkpoints=3", "lora.dropout=0.1",
             "hooks=[save_adapter]"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return cli_run_dir(tmp_path_factory, *RESUMABLE)


@pytest.mark.parametrize("fault", ["step:1", "step:5", "save:6", "step:9"])
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, uninterrupted, fault):
    crashed = run_cli(*RESUMABLE, f"hydra.run.dir={tmp_path}", env={"LORAFIT_FAULT": fault})
    assert crashed.returncode == -signal.SIGKILL
    assert not (tmp_path / "adapter").exists()  # died before the end: no final adapter, not a half one
    if fault == "save:6":  # killed mid-save: the half-written checkpoint is there but never used
        assert (tmp_path / "checkpoints" / ".tmp_step_6").is_dir() and (tmp_path / "checkpoints" / "step_4").is_dir()
    resumed = run_cli(*RESUMABLE, "train.resume=auto", f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected_start = {"step:1": 0, "step:5": 4, "save:6": 4, "step:9": 8}[fault]
    assert ("resumed from" in resumed.stdout) == (expected_start > 0)
    if expected_start:
        assert f"at step {expected_start}/10" in resumed.stdout
    a = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_lines(uninterrupted) == metrics_lines(tmp_path)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == ["step_10", "step_6", "step_8"]  # train.keep_checkpoints=3


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path):
    out = run_cli(*TINY_CLS, "train.max_steps=30", "train.save_every=1", "train.lr=1e30", "train.max_grad_norm=0",
                  "train.warmup_ratio=0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "non-finite loss or gradient at step" in out.stderr and "train.on_nonfinite=skip" in out.stderr
    assert list((tmp_path / "checkpoints").glob("step_*")) and not (tmp_path / "adapter").exists()


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
    out = run_cli(*TINY_CLS, "train.max_steps=12", "train.lr=1e30", "train.max_grad_norm=0", "train.warmup_ratio=0",
                  "train.on_nonfinite=skip", "hooks=[]", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] > 0


BAD_CONFIG = [
    ("lora.r=0", "lora.r"), ("lora.r=-4", "lora.r"), ("lora.alpha=0", "lora.alpha"), ("lora.dropout=1.0", "lora.dropout"),
    ("lora.dropout=-0.1", "lora.dropout"), ("lora.target_modules=[nope]", "nope"), ("lora.r=1000", "lora.r=1000"),
    ("lora.init=bogus", "lora.init"), ("lora.lr_ratio=-1", "lora.lr_ratio"), ("++lora.rank_pattern={query:0}", "lora.rank_pattern"),
    ("quant.mode=fp3", "quant.mode"), ("train.lr=0", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.optimizer=sgd", "train.optimizer"), ("train.scheduler=bogus", "train.scheduler"),
    ("train.mixed_precision=fp8", "train.mixed_precision"), ("train.resume=/no/such/ckpt", "train.resume"),
    ("train.eval_every=-1", "train.eval_every"), ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ("model.task=regress", "model.task"), ("model.dtype=int8", "model.dtype"), ("model.name=/no/such/model", "/no/such/model"),
    ("data.source=bogus", "data.source"), ("data=files", "data.train_file"), ("data.max_length=2", "data.max_length"),
    ("logging.backend=mlflow", "logging.backend"), ("hooks.merge.dtype=fp64", "hooks.merge.dtype"),
    ("lora.r=abc", "lora.r"), ("lora.bogus=1", "bogus"), ("recipe=nope", "recipe"), ("model=nope", "model"),
    ("train.lr=fast", "train.lr"), ("train.max_grad_norm=-1", "train.max_grad_norm"),
]


@pytest.mark.parametrize("override,needle", BAD_CONFIG, ids=[o for o, _ in BAD_CONFIG])
def test_bad_config_gets_one_clear_line(tmp_path, override, needle):
    extra = ["hooks=[save_adapter,spectrum,merge]"] if "hooks.merge" in override else []
    out = _cli_inprocess([override, *extra, f"hydra.run.dir={tmp_path}"])
    assert out["code"] != 0
    assert needle in out["stderr"], out["stderr"]
    assert "Traceback" not in out["stderr"] + out["stdout"]
    assert not any((tmp_path / p).exists() for p in ("adapter", "checkpoints", "summary.json", "metrics.jsonl"))


def _cli_inprocess(args: list[str]) -> dict:
    """`python -m lorafit ARGS` in this process (seconds instead of an interpreter start per case)."""
    from hydra.core.global_hydra import GlobalHydra

    from lorafit.__main__ import main

    code, argv = 0, sys.argv
    sys.argv = ["lorafit", *args]
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_DATA = {
    "missing_file": (lambda d: (d / "nope.csv", CLS_EVAL), "file not found"),
    "wrong_extension": (lambda d: (_csv(d / "train.txt", "text,label\na,b\n"), CLS_EVAL), "unsupported extension"),
    "no_text_column": (lambda d: (_csv(d / "t.csv", "body,label\nhello,a\n" * 20), CLS_EVAL), "no column 'text'"),
    "no_label_column": (lambda d: (_csv(d / "t.csv", "text,topic\nhello,a\n" * 20), CLS_EVAL), "no column 'label'"),
    "empty_split": (lambda d: (_csv(d / "t.csv", "text,label\n"), CLS_EVAL), "empty"),
    "eval_labels_unknown": (lambda d: (CLS_TRAIN, _csv(d / "e.csv", "text,label\nhello,weather\n")), "not in the training label set"),
    "not_utf8": (lambda d: (CLS_TRAIN, _bytes(d / "e.csv", b"text,label\n\xff\xfe caf\xe9,sport\n")), "could not be read"),
    "broken_jsonl": (lambda d: (_csv(d / "t.jsonl", '{"text": "a", "label": "x"}\n{"text": \n'), CLS_EVAL), "could not be read"),
    "too_small_for_a_batch": (lambda d: (_csv(d / "t.csv", "text,label\nhello,sport\nbye,tech\n"),) * 2, "too few for one batch"),
    "empty_labels": (lambda d: (_csv(d / "t.csv", "text,label\nhello,\nbye,tech\n" * 10), CLS_EVAL), "empty labels"),
    "directory_not_file": (lambda d: (d, CLS_EVAL), "file not found"),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_gets_one_clear_line_naming_the_file(tmp_path, case):
    make, needle = BAD_DATA[case]
    train, ev = make(tmp_path)
    run_dir = tmp_path / "run"
    args = [a for a in TINY_CLS if not a.startswith(("data.train_file", "data.eval_file"))]
    out = _cli_inprocess([*args, f"data.train_file={train}", f"data.eval_file={ev}", f"hydra.run.dir={run_dir}"])
    assert out["code"] == 2, out
    assert needle in out["stderr"], out["stderr"]
    named = str(ev) if case in ("eval_labels_unknown", "not_utf8") else str(train)  # the message names the bad file
    assert ("data." in out["stderr"] and (Path(named).name in out["stderr"] or "split" in out["stderr"])) or "batch" in out["stderr"]
    assert "Traceback" not in out["stderr"]
    assert not any((run_dir / p).exists() for p in ("adapter", "checkpoints", "summary.json"))


def test_long_rows_are_truncated_with_a_count(tmp_path):
    train = _csv(tmp_path / "t.csv", "text,label\n" + "".join(f"{'word ' * 200},sport\nshort,tech\n" for _ in range(10)))
    out = run_cli(*[a for a in TINY_CLS if not a.startswith("data.")], "data=files", f"data.train_file={train}", f"data.eval_file={train}",
                  "data.max_length=32", "train.batch_size=4", "train.max_steps=1", "hooks=[]", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "10 of 20 train rows are longer than data.max_length=32 and were truncated" in out.stdout + out.stderr


def test_no_secret_reaches_the_run_dir(tmp_path):
    """A token pasted into the config (here as the run name) must not reach config.yaml, Hydra's .hydra/ record of
    the overrides, nor the tracker's config: redaction has to act for the test to pass."""
    fake = "hf_FAKEtoken0123456789abcdefghijklmnop"
    out = run_cli(*TINY_CLS, "train.max_steps=2", "hooks=[save_adapter,spectrum]", "logging=tensorboard",
                  f"logging.run_name={fake}", f"hydra.run.dir={tmp_path}", env={"HF_TOKEN": fake, "WANDB_API_KEY": fake + "w"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run_name: <redacted>" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / ".hydra" / "overrides.yaml").is_file()
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert fake.encode() not in f.read_bytes(), f


def test_fp16_overflow_steps_are_skipped_the_gradscaler_way(tmp_path, monkeypatch):
    """fp16's GradScaler starts too high and overflows at first: routine, not an error. accelerate makes no scaler
    on CPU, so the run gets a CPU GradScaler, and the first 3 backward passes an inf gradient, as an fp16 overflow
    gives. The scaler must skip those updates and lower its scale; training goes on and learns."""
    from accelerate import Accelerator

    from lorafit import adapters
    from lorafit import run as run_module

    scalers, attach = [], adapters.attach_lora

    def accelerator_with_scaler(cfg, run_dir):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=2.0**16))
        acc = Accelerator(mixed_precision="no", project_dir=str(run_dir))
        acc.scaler = scalers[0]
        return acc

    def attach_overflowing(model, cfg):
        model, calls = attach(model, cfg), []
        first = next(p for p in model.parameters() if p.requires_grad)
        first.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) <= 3 else g)[1])
        return model

    monkeypatch.setattr(run_module, "_accelerator", accelerator_with_scaler)
    monkeypatch.setattr(adapters, "attach_lora", attach_overflowing)
    _, summary = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=30", "hooks=[]")  # on_nonfinite=stop
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0 and summary["overflow_steps"] == 3
    assert scalers[0].get_scale() == 2.0**16 * 0.5**3  # halved once per overflow (growth needs 2000 clean steps)
    assert summary["eval"]["accuracy"] > 0.5  # 3 classes: it learned after the overflow steps


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path):
    out = _cli_inprocess([*TINY_CLS, "train.mixed_precision=fp16", f"hydra.run.dir={tmp_path}"])
    assert out["code"] == 2 and "train.mixed_precision=fp16 needs a GPU" in out["stderr"]
