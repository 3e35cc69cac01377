"""Rank sweeps: a real multirun, its sweep.json and report, full fine-tuning as baseline, W&B offline groups."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_CLS, run_cli

SWEEP = [*TINY_CLS, "train.max_steps=12", "hooks=[save_adapter,spectrum]"]


def test_rank_sweep_writes_runs_sweep_json_and_report(tmp_path):
    out = run_cli("-m", *SWEEP, "lora.r=1,2,4", "train.seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["jobs"]) == 6 and all(j["status"] == "done" for j in sweep["jobs"])
    for job in sweep["jobs"]:  # every value in the sweep matches the run's own summary.json
        summary = json.loads((Path(job["run_dir"]) / "summary.json").read_text())
        assert job["metric"] == summary["eval"]["accuracy"] and job["r"] == summary["lora_r"]
        assert job["trainable_params"] == summary["trainable_params"] and f"lora.r={job['r']}" in job["overrides"]
    assert sorted((j["r"], j["seed"]) for j in sweep["jobs"]) == [(r, s) for r in (1, 2, 4) for s in (0, 1)]
    report = (tmp_path / "report.md").read_text()
    assert "Recommended rank: r=" in report and "Subspace similarity" in report and "spectrum advisor" in report
    for png in ("metric_vs_rank.png", "params_vs_rank.png", "spectrum_vs_rank.png", "phi_vs_largest.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
    # The recommendation is what the rule says, recomputed here from the runs' own numbers.
    means = {r: sum(j["metric"] for j in sweep["jobs"] if j["r"] == r) / 2 for r in (1, 2, 4)}
    best = max(means.values())
    assert f"r={min(r for r, m in means.items() if m >= best - 0.005)}**" in report


def test_full_fine_tuning_baseline_in_a_sweep(tmp_path):
    out = run_cli("-m", *SWEEP, "lora=default,full", "train.max_steps=6", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = json.loads((tmp_path / "sweep.json").read_text())["jobs"]
    full = next(j for j in jobs if j["method"] == "full")
    lora = next(j for j in jobs if j["method"] == "lora")
    assert full["trainable_params"] > 20 * lora["trainable_params"]
    assert (Path(full["run_dir"]) / "model" / "model.safetensors").is_file()  # the whole model, no adapter
    assert "| full |" in (tmp_path / "report.md").read_text()


def test_sweep_on_wandb_offline_records_group_and_config(tmp_path):
    out = run_cli("-m", *SWEEP, "lora.r=2,4", "train.max_steps=3", "logging=wandb", f"hydra.sweep.dir={tmp_path / 'sw' / 't1'}",
                  env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    for job in json.loads((tmp_path / "sw" / "t1" / "sweep.json").read_text())["jobs"]:
        (record,) = Path(job["run_dir"]).glob("wandb/offline-run-*/run-*.wandb")
        blob = record.read_bytes()
        assert b"2\x05sw-t1" in blob  # the run record's group field is the sweep's name
        assert f'{{"method":"lora","r":{job["r"]},'.encode() in blob  # the resolved config's JSON went up with the run
        files = record.parent / "files"  # the spectrum hook logged its plots and per-module table to the run
        assert list(files.glob("media/images/spectrum/*.png")) and list(files.glob("media/table/spectrum/*.table.json"))


def test_sweep_report_cli_errors_cleanly(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "lorafit.sweep_report", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "no job dirs" in out.stderr and "Traceback" not in out.stderr


def test_sweep_report_groups_by_the_other_swept_keys_instead_of_averaging_them(tmp_path):
    """r in {4, 16} x lr in {1e-3, 1e-5} x 2 seeds: the best runs are r=4 at lr 1e-3. Averaging over lr as if it were a
    seed (the old report) ranked r=16 first, because r=16 suffers less at the bad lr."""
    import yaml

    from lorafit.sweep_report import write_report

    acc = {(4, "0.001"): (0.96, 0.962), (16, "0.001"): (0.950, 0.952), (4, "1e-05"): (0.50, 0.52), (16, "1e-05"): (0.70, 0.72)}
    n = 0
    for (r, lr), per_seed in acc.items():
        for seed, a in enumerate(per_seed):
            job = tmp_path / str(n)
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny-bert", f"lora.r={r}", f"train.lr={lr}",
                                                                           f"train.seed={seed}"]))
            (job / "summary.json").write_text(json.dumps({"method": "lora", "lora_r": r, "seed": seed, "primary_metric": "accuracy",
                                                          "eval": {"accuracy": a}, "trainable_params": 1000 * r, "wall_s": 1.0,
                                                          "samples_per_s": 1.0}))
            n += 1
    report = write_report(tmp_path).read_text()
    assert "**Recommended rank: r=4** (with train.lr=0.001)" in report and "(0.9610)" in report  # the mean of 2 seeds
    assert "2 settings" in report and "| train.lr=1e-05 | 16 |" in report
    jobs = json.loads((tmp_path / "sweep.json").read_text())["jobs"]
    assert {j["setting"] for j in jobs} == {"train.lr=0.001", "train.lr=1e-05"}  # model=tiny-bert is common: not a setting
    assert (tmp_path / "metric_vs_rank.png").stat().st_size > 5000
