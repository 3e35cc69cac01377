"""Two real (gloo DDP) processes on CPU give what one process gives at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import REPO, TINY_CLS, run_cli
from safetensors.torch import load_file

COMMON = [*TINY_CLS, "train.max_steps=6", "lora.dropout=0.0", "model.dropout=0.0", "hooks=[save_adapter]",
          "data.max_eval_samples=47", "train.eval_batch_size=5",  # 47 rows over 2 processes: padding duplicates
          "train.lr=5e-3"]  # a realistic step (the tiny-model tests' 5e-2 amplifies summation-order noise to ~1e-6)


def launch_two(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    # ACCELERATE_USE_CPU=1 with --multi_gpu is the only form that gives real DDP on CPU
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lorafit", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def test_ddp_two_processes_match_one_and_count_eval_rows_once(tmp_path):
    one = run_cli(*COMMON, "train.batch_size=8", "train.save_every=3", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*COMMON, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s1["eval"]["n"] == s2["eval"]["n"] == 47  # gathered without the duplicates that pad the last batch
    assert s1["eval"]["accuracy"] == s2["eval"]["accuracy"]
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    # A 1-process checkpoint can't be resumed by 2 processes (per-process RNG files, data shards): said clearly.
    again = launch_two(*COMMON, "train.batch_size=4", "train.resume=auto", f"hydra.run.dir={tmp_path / 'one'}")
    assert again.returncode != 0
    assert "lorafit: error: checkpoint" in again.stderr and "written by 1 processes and this run has 2" in again.stderr
    assert f'File "{REPO / "lorafit"}' not in again.stderr  # torchrun prints its own launcher trace; none is ours


def test_ddp_checkpoints_hold_every_process_state_and_resume_bitwise_after_sigkill(tmp_path):
    """Process 1 is made to write its checkpoint state late (tests/slow_rank): each checkpoint must still hold both
    processes' RNG states. Then a 2-process run killed after step 5 resumes to the uninterrupted adapter, bitwise."""
    args = [*COMMON, "train.batch_size=4", "train.save_every=2", "train.keep_checkpoints=5", "lora.dropout=0.1"]
    slow = {"LORAFIT_TEST_SLOW_RANK": "1", "PYTHONPATH": str(REPO / "tests" / "slow_rank")}
    full = launch_two(*args, f"hydra.run.dir={tmp_path / 'full'}", env=slow)
    assert full.returncode == 0, full.stderr[-3000:]
    for step in (2, 4, 6):
        ckpt = tmp_path / "full" / "checkpoints" / f"step_{step}"
        assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    crashed = launch_two(*args, f"hydra.run.dir={tmp_path / 'crash'}", env={"LORAFIT_FAULT": "step:5"})
    assert crashed.returncode != 0 and not (tmp_path / "crash" / "adapter").exists()
    resumed = launch_two(*args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'crash'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 4/6" in resumed.stdout
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("full", "crash"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_fsdp_config_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path):
    """accelerate 1.15 sets up FSDP only on GPU-type devices: with ACCELERATE_USE_CPU=1 an FSDP config silently
    becomes plain DDP (MULTI_CPU). lorafit says so instead of training something else than asked."""
    config = tmp_path / "cpu_fsdp.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\nuse_cpu: true\nfsdp_config:\n  fsdp_version: 2\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "lorafit",
                          *COMMON, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0 and not (tmp_path / "run" / "adapter").exists()
    assert "lorafit: error: the accelerate config asks for FSDP, but accelerate set up MULTI_CPU" in out.stderr
