"""Run dirs, checkpoints, resume and preemption: nothing of another run is taken over or lost, nothing in a
checkpoint runs code, and SIGTERM (how schedulers stop jobs) costs no steps."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CLS, cli_run_dir, compose, metrics_lines, run_cli, run_inprocess
from safetensors.torch import load_file

from lorafit.errors import UserError

SHORT = [*TINY_CLS, "train.max_steps=6", "train.save_every=3", "hooks=[save_adapter]"]


def _run(run_dir: Path, *overrides: str) -> None:
    from lorafit.run import run

    run(compose(*overrides), run_dir=run_dir)


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_dir_holding_a_run_is_refused_and_overwrite_clears_only_lorafit_files(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, *SHORT)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- train.lr=5e-2\n")  # Hydra's record: not lorafit's
    (run_dir / "notes.txt").write_text("mine")  # the user's
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run") as e:
        _run(run_dir, *SHORT, "train.lr=1e-3", "train.seed=2")
    assert "train.resume=auto" in str(e.value) and "train.overwrite=true" in str(e.value) and "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing touched
    # replaced: run 1's checkpoints, metrics and summary are gone; Hydra's record and the user's file stay
    _run(run_dir, *[a for a in SHORT if "save_every" not in a], "train.lr=1e-3", "train.seed=2", "train.overwrite=true")
    assert not (run_dir / "checkpoints").exists()
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["seed"] == 2
    assert [m["step"] for m in metrics_lines(run_dir) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]  # run 2's alone
    with pytest.raises(UserError, match="set one of them"):
        _run(run_dir, *SHORT, "train.overwrite=true", "train.resume=auto")


def test_resume_refuses_a_checkpoint_of_other_settings_naming_the_keys(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, *SHORT)
    with pytest.raises(UserError) as e:
        _run(run_dir, *SHORT, "train.resume=auto", "train.batch_size=4", "train.lr=1e-3", "train.save_every=2")
    said = str(e.value)
    assert "train.batch_size=8 there, 4 now" in said and "train.lr=0.05 there, 0.001 now" in said
    assert "save_every" not in said and "\n" not in said  # how often to save does not change the trajectory
    # train.max_steps sets the learning-rate schedule: it counts
    with pytest.raises(UserError, match=r"train\.max_steps=6 there, 9 now"):
        _run(run_dir, *SHORT, "train.resume=auto", "train.max_steps=9")
    _run(run_dir, *SHORT, "train.resume=auto", "train.save_every=2", "train.eval_every=2")  # these may change


def _plant(path: Path, marker: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"state": RunsCode()}))


@pytest.mark.parametrize("victim", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_in_a_checkpoint_runs_no_code_and_is_named(tmp_path, victim):
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    _run(run_dir, *SHORT)
    ckpt = run_dir / "checkpoints" / "step_6"
    _plant(ckpt / victim, marker)
    with pytest.raises(UserError) as e:
        _run(tmp_path / "other", *SHORT, f"train.resume={ckpt}")
    assert not marker.exists()
    assert f"checkpoint file {ckpt / victim} holds something other than plain tensors" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_corrupt_checkpoint_file_gets_one_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, *SHORT)
    ckpt = run_dir / "checkpoints" / "step_6"
    data = (ckpt / "random_states_0.pkl").read_bytes()
    (ckpt / "random_states_0.pkl").write_bytes(data[: len(data) // 2])  # accelerate would skip it silently
    with pytest.raises(UserError, match=f"checkpoint file {ckpt / 'random_states_0.pkl'} .* or is corrupt"):
        _run(run_dir, *SHORT, "train.resume=auto")


LOGGED = [*TINY_CLS, "train.max_steps=8", "train.log_every=4", "train.save_every=3", "hooks=[save_adapter]"]


def test_the_loss_window_is_checkpointed_so_resumed_metrics_are_identical(tmp_path, monkeypatch):
    """log_every=4 does not divide save_every=3: the loss logged at step 4 averages steps 1-4, three of them before
    the checkpoint at step 3. Stopped there and resumed, it must be the same number."""
    full, _ = run_inprocess(tmp_path / "full", *LOGGED)
    monkeypatch.setenv("LORAFIT_FAULT", "term:3")  # stops after step 3's checkpoint
    with pytest.raises(SystemExit) as stop:
        _run(tmp_path / "stopped", *LOGGED)
    assert stop.value.code == 75
    monkeypatch.delenv("LORAFIT_FAULT")
    _run(tmp_path / "stopped", *LOGGED, "train.resume=auto")
    assert metrics_lines(tmp_path / "stopped") == metrics_lines(full)
    assert _same(_adapter(full), _adapter(tmp_path / "stopped"))


def test_a_torn_last_metrics_line_is_dropped_and_a_broken_one_named(tmp_path):
    run_dir = tmp_path / "run"
    _run(run_dir, *SHORT)
    lines = (run_dir / "metrics.jsonl").read_text()
    kept = [l for l in lines.splitlines() if json.loads(l)["step"] <= 3]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 4, "train/lo')  # died mid-write at step 4
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_6")
    _run(run_dir, *SHORT, "train.resume=auto")  # from step 3
    assert (run_dir / "metrics.jsonl").read_text() == lines
    (run_dir / "metrics.jsonl").write_text(kept[0] + '\n{"step": 2, "train/lo\n' + kept[1] + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not JSON"):
        _run(run_dir, *SHORT, "train.resume=auto")


def test_redact_masks_credentials_not_token_counts(monkeypatch):
    from lorafit.run import redact

    monkeypatch.setenv("HF_TOKEN", "hf_fake_env_value")
    found = set()
    out = redact({"eval": {"max_new_tokens": 64}, "model": {"pad_token_id": 0, "hf_token": "hf_x", "revision":
                  "hf_fake_env_value"}, "logging": {"wandb_api_key": "k", "apikey": "k2", "secret": "s"}}, found)
    assert out["eval"]["max_new_tokens"] == 64 and out["model"]["pad_token_id"] == 0
    assert out["model"]["hf_token"] == out["model"]["revision"] == out["logging"]["wandb_api_key"] == "<redacted>"
    assert out["logging"]["apikey"] == out["logging"]["secret"] == "<redacted>"
    assert found == {"hf_x", "hf_fake_env_value", "k", "k2", "s"}


# ---- preemption: SIGTERM / SIGUSR1 checkpoint at the next step boundary, exit 75, resume bitwise --------------------

PREEMPTIBLE = [*TINY_CLS, "train.max_steps=200", "train.save_every=0", "lora.dropout=0.1", "hooks=[save_adapter]"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return cli_run_dir(tmp_path_factory, *PREEMPTIBLE)


def _resume_matches(run_dir: Path, uninterrupted: Path, stopped_at: int) -> None:
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == [f"step_{stopped_at}"]
    resumed = run_cli(*PREEMPTIBLE, "train.resume=auto", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {stopped_at}/200" in resumed.stdout
    assert _same(_adapter(uninterrupted), _adapter(run_dir))
    assert metrics_lines(uninterrupted) == metrics_lines(run_dir)


def test_sigterm_at_a_random_step_checkpoints_there_and_resumes_bitwise(tmp_path, uninterrupted):
    step = random.randint(1, 199)
    out = run_cli(*PREEMPTIBLE, f"hydra.run.dir={tmp_path}", env={"LORAFIT_FAULT": f"term:{step}"})
    assert out.returncode == 75, (step, out.stderr[-2000:])
    assert f"lorafit: SIGTERM: stopped after step {step} with a checkpoint" in out.stderr
    assert not (tmp_path / "adapter").exists()
    _resume_matches(tmp_path, uninterrupted, step)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_from_outside_checkpoints_at_the_next_step(tmp_path, uninterrupted, sig):
    cmd = [sys.executable, "-m", "lorafit", *PREEMPTIBLE, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("train/loss") >= 2) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    stopped_at = int(err.split("stopped after step ")[1].split()[0])
    assert 2 <= stopped_at < 200
    _resume_matches(tmp_path, uninterrupted, stopped_at)


def test_two_processes_agree_on_a_signal_that_reached_one_and_resume_bitwise(tmp_path):
    """SIGTERM to process 1 only (as when a scheduler signals one task): both processes checkpoint at the same step,
    with both processes' RNG states, and the resumed run ends with the uninterrupted adapter."""
    from test_distributed import COMMON, adapters_of, launch_two

    args = [*COMMON, "train.batch_size=4", "train.save_every=0", "lora.dropout=0.1"]
    full = launch_two(*args, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = launch_two(*args, f"hydra.run.dir={tmp_path / 'stop'}", env={"LORAFIT_FAULT": "term:3:1"})
    assert stopped.returncode != 0 and "lorafit: another process's signal: stopped after step 3" in stopped.stderr
    ckpt = tmp_path / "stop" / "checkpoints" / "step_3"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    resumed = launch_two(*args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'stop'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3/6" in resumed.stdout
    a, b = adapters_of(tmp_path / "full", tmp_path / "stop")
    assert _same(a, b) and metrics_lines(tmp_path / "full") == metrics_lines(tmp_path / "stop")
