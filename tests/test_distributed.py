"""Two real gloo processes on CPU, through the shipped launch configs (cpu_ddp.yaml: DDP, cpu_fsdp.yaml: FSDP2,
cpu_zero2.yaml / cpu_zero3.yaml: DeepSpeed), give what one process gives at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_CLS, TINY_LM, metrics_lines, run_cli
from safetensors.torch import load_file

COMMON = [*TINY_CLS, "train.max_steps=6", "lora.dropout=0.0", "model.dropout=0.0", "hooks=[save_adapter]",
          "data.max_eval_samples=47", "train.eval_batch_size=5",  # 47 rows over 2 processes: padding duplicates
          "train.lr=5e-3"]  # a realistic step (the tiny-model tests' 5e-2 amplifies summation-order noise to ~1e-6)


def launch_two(*args, env: dict | None = None, config: str = "cpu_ddp.yaml", timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file conf/accelerate/CONFIG -m lorafit ARGS`, 2 processes, as the README says."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "conf" / "accelerate" / config),
           "-m", "lorafit", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def adapters_of(*dirs) -> list[dict]:
    return [load_file(d / "adapter" / "adapter_model.safetensors") for d in dirs]


def grad_norms(run_dir) -> list[float]:
    return [l["train/grad_norm"] for l in metrics_lines(run_dir) if "train/grad_norm" in l]


def test_ddp_two_processes_match_one_and_count_eval_rows_once(tmp_path):
    one = run_cli(*COMMON, "train.batch_size=8", "train.save_every=3", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*COMMON, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["processes"] == 2 and s1["processes"] == 1
    assert s1["eval"]["n"] == s2["eval"]["n"] == 47  # gathered without the duplicates that pad the last batch
    assert s1["eval"]["accuracy"] == s2["eval"]["accuracy"]
    a, b = adapters_of(tmp_path / "one", tmp_path / "two")
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
    a, b = adapters_of(tmp_path / "full", tmp_path / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FSDP_LM = [*TINY_LM, "train.max_steps=6", "lora.dropout=0.0", "train.lr=5e-3", "data.max_eval_samples=47",
           "train.eval_batch_size=5"]


FSDP_CLS = [*TINY_CLS, "train.max_steps=6", "lora.dropout=0.0", "model.dropout=0.0", "train.lr=5e-3",
            "data.max_eval_samples=47", "train.eval_batch_size=5"]
# (overrides, train.max_grad_norm below every step's norm, the head saved in full with the adapter)
FSDP_CASES = {
    "causal_lm": (FSDP_LM, 0.5, []),
    # BERT lists BertEmbeddings among its layer classes, and a new head has two weights: see models.fsdp_unit_classes
    # and models.materialize_meta_weights
    "encoder_classifier": (FSDP_CLS, 0.05, ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]),
    "decoder_classifier": ([*FSDP_LM, "model.task=seq_cls"], 0.05, ["base_model.model.score.weight"]),  # a reward model
}


@pytest.mark.parametrize("case", FSDP_CASES)
def test_fsdp_two_processes_match_one_with_global_clipping_and_hooks_on_the_gathered_model(tmp_path, case):
    """cpu_fsdp.yaml: batch 8 on each of 2 FSDP2 processes trains the adapter 1 process trains at batch 16, clipped by
    the same (global) gradient norm; the hooks, on the main process, see the whole trained model and write once. A
    classifier's head, trained in full, comes back in the adapter and in the merged model."""
    overrides, clip, heads = FSDP_CASES[case]
    args = [*overrides, f"train.max_grad_norm={clip}", "hooks=[save_adapter,spectrum,merge]", "hooks.spectrum.plots=false"]
    one = run_cli(*args, "train.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*args, "train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}", config="cpu_fsdp.yaml")
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s2["distributed"], s2["processes"]) == ("FSDP", 2) and s1["processes"] == 1
    assert s1["eval"]["n"] == s2["eval"]["n"] == 47
    assert s1["eval"].keys() == s2["eval"].keys()
    assert all(abs(s1["eval"][k] - s2["eval"][k]) <= 1e-5 * max(1, abs(s1["eval"][k])) for k in s1["eval"]), (s1, s2)
    norms1, norms2 = grad_norms(tmp_path / "one"), grad_norms(tmp_path / "two")
    assert len(norms1) == 6 and min(norms1) > clip  # every step was clipped ...
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(norms1, norms2))  # ... by the norm over all shards
    a, b = adapters_of(tmp_path / "one", tmp_path / "two")
    assert a.keys() == b.keys() and sorted(k for k in a if ".lora_" not in k) == heads
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
    # the hooks ran once, on the gathered weights: the same spectrum, an exact merge, one summary printed
    spec1, spec2 = (json.loads((tmp_path / d / "analysis" / "spectrum.json").read_text()) for d in ("one", "two"))
    assert len(spec2["modules"]) == len(spec1["modules"]) == sum(".lora_A." in k for k in a)
    for m1, m2 in zip(spec1["modules"], spec2["modules"]):
        assert m1["name"] == m2["name"] and abs(m1["singular_values"][0] - m2["singular_values"][0]) < 1e-5
    assert s2["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    m1, m2 = (load_file(tmp_path / d / "merged" / "model.safetensors") for d in ("one", "two"))
    assert m1.keys() == m2.keys() and all(torch.allclose(m1[k], m2[k], atol=1e-5, rtol=0) for k in m1)
    assert two.stdout.count("done: 6 steps") == 1 and two.stdout.count("step 6: eval/") == 1


@pytest.mark.parametrize("config", ["cpu_fsdp.yaml", "cpu_zero3.yaml"])
def test_a_sharded_run_resumes_after_sigkill_to_the_uninterrupted_adapter(tmp_path, config):
    """Checkpoints of a sharded model (FSDP: torch DCP shards; DeepSpeed: its engine's checkpoint without the frozen
    base; both through accelerate) resume bitwise: a 2-process run killed after step 5 resumes from step 4."""
    args = [*FSDP_LM, "train.batch_size=8", "train.save_every=2", "hooks=[save_adapter]"]
    full = launch_two(*args, f"hydra.run.dir={tmp_path / 'full'}", config=config)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = launch_two(*args, f"hydra.run.dir={tmp_path / 'crash'}", env={"LORAFIT_FAULT": "step:5"}, config=config)
    assert crashed.returncode != 0 and not (tmp_path / "crash" / "adapter").exists()
    resumed = launch_two(*args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'crash'}", config=config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 4/6" in resumed.stdout
    a, b = adapters_of(tmp_path / "full", tmp_path / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", ["cpu_fsdp.yaml", "cpu_zero3.yaml"])
def test_save_best_on_a_sharded_model_gathers_the_best_weights_and_puts_them_back(tmp_path, config):
    """train.save_best gathers the trainable weights at each new best and, at the end, puts them back into the sharded
    model (FSDP: its shards; DeepSpeed: its fp32 masters), so the hooks save the best adapter, not the last."""
    # a constant lr of 0.1 overshoots: the eval loss is lowest at step 7 of 10 and rises after it (by 0.012)
    best = launch_two(*FSDP_LM, "train.batch_size=8", "train.max_steps=10", "train.lr=0.1", "train.scheduler=constant",
                      "train.warmup_ratio=0", "train.eval_every=1", "train.save_best=true", "hooks=[save_adapter]",
                      f"hydra.run.dir={tmp_path / 'best'}", config=config)
    assert best.returncode == 0, best.stderr[-3000:]
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    assert summary["best_step"] == summary["adapter_step"] < 10
    kept = load_file(tmp_path / "best" / "checkpoints" / "best.safetensors")
    (saved,) = adapters_of(tmp_path / "best")
    assert len(kept) == len(saved) == 28  # trainable weights only (not the frozen tied LM head)
    assert all(torch.equal(kept[k], saved[k.replace(".default", "")]) for k in kept)
    evals = {l["step"]: l["eval/loss"] for l in metrics_lines(tmp_path / "best") if "eval/loss" in l}
    assert summary["eval"]["loss"] == evals[summary["best_step"]] < evals[10]


@pytest.mark.parametrize("config", ["cpu_fsdp.yaml", "cpu_zero3.yaml"])
def test_generation_eval_on_a_sharded_model_runs_on_every_process_and_is_written_once(tmp_path, write_jsonl, config):
    """eval.generate on a sharded model: each forward needs every process, so all generate in step (no hang)."""
    rows = write_jsonl("t.jsonl", [{"prompt": "Say hello.", "response": "hello there friend"}] * 16)
    out = launch_two("model=tiny-llama", "data=sft", f"data.train_file={rows}", "train.mixed_precision=no",
                     "lora.target_modules=all-linear",
                     "train.batch_size=2", "train.max_steps=4", "train.eval_every=2", "eval.generate=2",
                     "eval.max_new_tokens=8", "hooks=[]", f"hydra.run.dir={tmp_path / 'run'}", config=config,
                     timeout=180)  # generating on the main process alone hangs: the others wait in another collective
    assert out.returncode == 0, out.stderr[-3000:]
    samples = [json.loads(l) for l in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    evals = [l for l in metrics_lines(tmp_path / "run") if "eval/gen_rouge_l" in l]
    assert [l["step"] for l in evals] == [2, 4]


def test_fsdp_qlora_with_float_quant_storage_matches_one_process(tmp_path):
    """QLoRA under FSDP2: nf4 weights stored as bfloat16 (quant.quant_storage) are sharded like the rest; with fp32
    compute, 2 processes train the 1-process adapter, and the merge hook dequantizes the gathered copy exactly."""
    args = [*FSDP_LM, "train.max_steps=3", "quant=nf4", "quant.quant_storage=bfloat16", "quant.compute_dtype=float32",
            "hooks=[save_adapter,merge]"]
    one = run_cli(*args, "train.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*args, "train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}", config="cpu_fsdp.yaml")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = adapters_of(tmp_path / "one", tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["distributed"] == "FSDP" and summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4


def test_launches_accelerate_would_run_as_something_else_are_refused_in_one_line(tmp_path):
    """FSDP1 has no CPU path in accelerate ("no available devices"): FSDP on CPU processes means FSDP2. DeepSpeed
    without use_cpu on a machine without a GPU: accelerate sets up DeepSpeed but counts 1 process of 2."""
    fsdp1, no_cpu = tmp_path / "fsdp1.yaml", tmp_path / "zero2_no_cpu.yaml"
    fsdp1.write_text((REPO / "conf" / "accelerate" / "cpu_fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    no_cpu.write_text((REPO / "conf" / "accelerate" / "cpu_zero2.yaml").read_text().replace("use_cpu: true", "use_cpu: false"))
    for config, env, message in (
            (fsdp1, {}, "lorafit: error: FSDP on CPU processes needs fsdp_version: 2"),
            (no_cpu, {"ACCELERATE_USE_CPU": "0"}, "lorafit: error: the accelerate config asks for DEEPSPEED on 2 "
                                                  "processes, but accelerate set up DEEPSPEED on 1")):
        out = launch_two(*COMMON, "train.batch_size=4", f"hydra.run.dir={tmp_path / config.stem}", config=str(config),
                         env=env)
        assert out.returncode != 0 and not (tmp_path / config.stem / "adapter").exists()
        assert message in out.stderr, out.stderr[-2000:]


def test_deepspeed_zero2_and_zero3_match_one_process_with_accumulation_and_hooks_on_the_gathered_weights(tmp_path):
    """DeepSpeed on 2 CPU processes, batch 4 x 2 accumulated micro-batches each = 1 process at batch 16: the engine
    steps once per step (not per micro-batch), clips by the global norm, and the hooks get the fp32 weights. ZeRO-3
    runs with a persistence threshold of 0, so that every weight of the tiny model is really partitioned."""
    args = [*FSDP_LM, "train.max_grad_norm=0.5", "hooks=[save_adapter,spectrum,merge]", "hooks.spectrum.plots=false"]
    one = run_cli(*args, "train.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    zero3 = tmp_path / "zero3.yaml"
    (tmp_path / "zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    zero3.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
                     f"use_cpu: true\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero3.json'}\n"
                     "  zero3_init_flag: true\n")  # cpu_zero3.yaml, with a DeepSpeed json instead of its keys
    norms1 = grad_norms(tmp_path / "one")
    assert len(norms1) == 6 and min(norms1) > 0.5  # every step was clipped
    (a,) = adapters_of(tmp_path / "one")
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    for name, config in (("zero2", "cpu_zero2.yaml"), ("zero3", str(zero3))):
        out = launch_two(*args, "train.batch_size=4", "train.grad_accum=2", f"hydra.run.dir={tmp_path / name}", config=config)
        assert out.returncode == 0, out.stderr[-3000:]
        s2 = json.loads((tmp_path / name / "summary.json").read_text())
        assert (s2["distributed"], s2["processes"], s2["steps"]) == ("DEEPSPEED", 2, 6)
        assert s2["eval"]["n"] == 47 and abs(s1["eval"]["loss"] - s2["eval"]["loss"]) < 1e-5
        norms2 = grad_norms(tmp_path / name)
        assert all(abs(x - y) <= 1e-5 * x for x, y in zip(norms1, norms2)), (name, norms1, norms2)
        (b,) = adapters_of(tmp_path / name)
        assert a.keys() == b.keys() and all(b[k].dtype == torch.float32 for k in b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (name, k, (a[k] - b[k]).abs().max())
        assert s2["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4 and (tmp_path / name / "analysis" / "spectrum.json").is_file()
        assert out.stdout.count("done: 6 steps") == 1


def test_fsdp_layer_classes_leave_out_those_that_hold_the_embeddings():
    """accelerate shards the input embeddings on their own after the layer classes: BERT's BertEmbeddings, which holds
    them, is left out of the default (the model's _no_split_modules), and refused in one line where the accelerate
    config names it."""
    from conftest import compose

    from lorafit.errors import UserError
    from lorafit.models import fsdp_unit_classes, meta_model

    bert = meta_model(compose(*TINY_CLS))
    assert "BertEmbeddings" in bert._no_split_modules
    assert fsdp_unit_classes(bert, None) == [c for c in bert._no_split_modules if c != "BertEmbeddings"]
    assert fsdp_unit_classes(bert, ["BertLayer"]) == ["BertLayer"]
    with pytest.raises(UserError, match="fsdp_transformer_layer_cls_to_wrap lists BertEmbeddings"):
        fsdp_unit_classes(bert, ["BertLayer", "BertEmbeddings"])


AUTO = [*FSDP_CLS, "lora.r=auto", "lora.r_max=8", "lora.alpha=16", "lora.auto_energy=0.8", "lora.auto_shrink_at=0.5",
        "hooks=[save_adapter]"]


@pytest.fixture(scope="module")
def auto_one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("auto_one")
    one = run_cli(*AUTO, "train.batch_size=16", f"hydra.run.dir={run_dir}")
    assert one.returncode == 0, one.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_fsdp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_auto_rank_shrinks_every_process_alike_and_trains_what_one_process_trains(tmp_path, auto_one_process, config):
    """lora.r=auto's in-run shrink on 2 processes (DDP; FSDP2 and DeepSpeed, where each process holds a shard of the
    factors or of their Adam moments): the same ranks, and the adapter 1 process trains at the same global batch."""
    two = launch_two(*AUTO, "train.batch_size=8", f"hydra.run.dir={tmp_path}", config=config)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (auto_one_process, tmp_path))
    assert s2["processes"] == 2 and s2["auto_rank"]["step"] == s1["auto_rank"]["step"] == 3
    assert s2["auto_rank"]["ranks"] == s1["auto_rank"]["ranks"] and s2["trainable_params"] == s1["trainable_params"]
    a, b = adapters_of(auto_one_process, tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, (a[k] - b[k]).abs().max())
