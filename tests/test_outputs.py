"""Output dirs: no writer replaces what it was not asked to; weighted merges are Σ wᵢ·ΔWᵢ; like-with-like merge
checks; --compare keeps every adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLS, TINY_LM, run_inprocess

from lorafit.errors import UserError


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """Two tiny-llama adapters of different ranks (8 and 4)."""
    root = tmp_path_factory.mktemp("lm")
    a, _ = run_inprocess(root / "a", *TINY_LM, "train.max_steps=10", "hooks=[save_adapter]")
    b, _ = run_inprocess(root / "b", *TINY_LM, "train.max_steps=10", "lora.r=4", "train.seed=1", "hooks=[save_adapter]")
    return a, b


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """{relative path: sha256} of every file under root (outside `skip`): what must survive a refused write."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


def cli(module: str, args: list, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python -m lorafit.MODULE ARGS`, run in this process."""
    import importlib

    try:
        importlib.import_module(f"lorafit.{module}").main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# writer: (module, argv before --out, which input, marker file of its output)
WRITERS = {
    "merge": ("merge", lambda run, model: [run], "merge_report.json"),
    "merge --stream": ("merge", lambda run, model: [run, "--stream"], "merge_report.json"),
    "shrink --rank": ("shrink", lambda run, model: [run, "--rank", 2], "shrink_report.json"),
    "shrink --energy": ("shrink", lambda run, model: [run, "--energy", 0.9], "shrink_report.json"),
    "shrink --intruders": ("shrink", lambda run, model: [run, "--intruders", 0.5], "intruder_report.json"),
    "compress": ("compress", lambda run, model: [model, "--rank", 4, "--modules", "mlp"], "lowrank.json"),
}
# target: whether a write is allowed there without --overwrite, and with it
TARGETS = {"empty": (True, True), "foreign": (False, True), "same kind": (True, True), "the input": (False, False),
           "parent of the input": (False, False), ".": (False, False), "..": (False, False)}


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "--overwrite"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("writer", WRITERS)
def test_every_out_taking_cli_writes_only_where_it_may(tmp_path, lm_runs, monkeypatch, capsys, writer, target, overwrite):
    from lorafit.models import resolve

    module, head, marker = WRITERS[writer]
    run, model = tmp_path / "inputs" / "run", tmp_path / "inputs" / "model"
    shutil.copytree(lm_runs[0], run)
    shutil.copytree(resolve("tiny-llama"), model)
    src = model if module == "compress" else run
    cwd = tmp_path / "work" / "cwd"
    cwd.mkdir(parents=True)
    (cwd / "mine.txt").write_text("the user's")
    (tmp_path / "work" / "theirs.txt").write_text("beside the cwd")
    monkeypatch.chdir(cwd)
    out = {"the input": src, "parent of the input": src.parent, ".": Path("."), "..": Path("..")}.get(target, tmp_path / "out")
    if target == "empty":
        out.mkdir()
    if target == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("not lorafit's")
    if target == "same kind":
        assert cli(module, [*head(run, model), "--out", out], capsys)[0] == 0
        (out / marker).write_text("{}")  # the earlier output, told apart from the new one
    before = snapshot(tmp_path)
    code, err = cli(module, [*head(run, model), "--out", out, *(["--overwrite"] if overwrite else [])], capsys)
    if TARGETS[target][overwrite]:
        assert code == 0, err
        assert json.loads((out / marker).read_text()) and not (out / "notes.txt").exists()
        assert snapshot(tmp_path, skip=out.resolve()) == {k: v for k, v in before.items() if not k.startswith("out/")}
    else:
        assert code == 2 and err.startswith("lorafit: error: --out") and len(err.strip().splitlines()) == 1, err
        assert snapshot(tmp_path) == before  # nothing written, nothing lost
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".old"))]  # no temp dirs left over


HOOKS = {"save_adapter": ("hooks.save_adapter.dir", "lorafit.json"), "merge": ("hooks.merge.dir", "merge_report.json")}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("hook", HOOKS)
def test_hook_dirs_are_checked_before_training(tmp_path, monkeypatch, hook, target):
    """The run dir is the hooks' input: they may (re)write their own output in it, never the run dir, a folder above
    it, the cwd or a foreign folder, and those are refused before any training."""
    key, marker = HOOKS[hook]
    run_dir, cwd = tmp_path / "runs" / "run", tmp_path / "work" / "cwd"
    cwd.mkdir(parents=True)
    (cwd / "mine.txt").write_text("the user's")
    (tmp_path / "work" / "theirs.txt").write_text("beside the cwd")
    (tmp_path / "runs" / "other_run").mkdir(parents=True)
    (tmp_path / "runs" / "other_run" / "summary.json").write_text("{}")
    monkeypatch.chdir(cwd)
    out = {"the input": ".", "parent of the input": "..", ".": str(cwd), "..": str(cwd.parent)}.get(target, str(tmp_path / "out"))
    if target == "empty":
        Path(out).mkdir()
    if target == "foreign":
        Path(out).mkdir()
        (Path(out) / "notes.txt").write_text("not lorafit's")
    from conftest import compose

    from lorafit.run import run

    overrides = [*TINY_CLS, "train.max_steps=2", f"hooks=[{hook}]", f"{key}={out}"]
    if target == "same kind":  # a finished run re-run into its own dir (as a resumed run is): its output is replaced
        run(compose(*overrides), run_dir=run_dir)
        (run_dir / out / marker).write_text("{}")
    before = snapshot(tmp_path)
    if TARGETS[target][False]:
        # the same run dir again: replacing its run is asked for (train.overwrite), its hook output may be replaced
        run(compose(*overrides, *(["train.overwrite=true"] if target == "same kind" else [])), run_dir=run_dir)
        assert json.loads((run_dir / out / marker).read_text())
        assert (tmp_path / "runs" / "other_run" / "summary.json").is_file() and (cwd / "mine.txt").is_file()
    else:
        with pytest.raises(UserError, match=f"^{key} "):
            run(compose(*overrides), run_dir=run_dir)
        assert snapshot(tmp_path) == before and not (run_dir / "metrics.jsonl").exists()  # refused before training


def test_atomic_dir_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    from lorafit.errors import atomic_dir

    out = tmp_path / "merged"
    out.mkdir()
    (out / "merge_report.json").write_text('{"old": 1}')
    with pytest.raises(RuntimeError), atomic_dir(out, "merged") as tmp:
        (tmp / "merge_report.json").write_text('{"new": 1}')
        raise RuntimeError("the writer failed half way")
    assert json.loads((out / "merge_report.json").read_text()) == {"old": 1} and sorted(tmp_path.iterdir()) == [out]
    with atomic_dir(out, "merged") as tmp:
        (tmp / "merge_report.json").write_text('{"new": 1}')
        assert json.loads((out / "merge_report.json").read_text()) == {"old": 1}  # still whole while the new is written
    assert json.loads((out / "merge_report.json").read_text()) == {"new": 1} and sorted(tmp_path.iterdir()) == [out]


# --- weighted merges ---------------------------------------------------------------------------------------------

def delta_weights(adapter: Path) -> dict[str, torch.Tensor]:
    """{module name: s·B·A} of an adapter, from its own files."""
    from lorafit.analysis.spectrum import lora_factors, read_adapter

    factors, _ = lora_factors(*read_adapter(adapter))
    return {f.name: f.scale * (f.B.double() @ f.A.double()) for f in factors}


def merged_deltas(merged: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).state_dict()
    state = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    return {k.removesuffix(".weight"): state[k].double() - base[k].double() for k in base if k.endswith(".weight")}


def test_weighted_merge_is_the_weighted_sum_of_the_updates(tmp_path, lm_runs, capsys):
    """Default merge of adapters of ranks 8 and 4: every merged ΔW is 0.7·ΔW_a + 0.3·ΔW_b; averaging an adapter with
    itself leaves its ΔW as it is (peft's `linear` doubled it)."""
    a, b = (run / "adapter" for run in lm_runs)
    assert cli("merge", [a, b, "--weights", 0.7, 0.3, "--out", tmp_path / "ab"], capsys)[0] == 0
    da, db, merged = delta_weights(a), delta_weights(b), merged_deltas(tmp_path / "ab")
    for name in da:
        want = 0.7 * da[name] + 0.3 * db[name]
        assert torch.allclose(merged[name], want, atol=1e-6 * float(want.abs().max())), name
    report = json.loads((tmp_path / "ab" / "merge_report.json").read_text())
    assert report["combination"] == "sum" and report["max_abs_diff_merged_vs_weighted_sum"] < 1e-3 * report["logit_scale"]

    assert cli("merge", [a, a, "--out", tmp_path / "aa"], capsys)[0] == 0
    merged = merged_deltas(tmp_path / "aa")
    for name, d in da.items():
        assert float(merged[name].norm() / d.norm()) == pytest.approx(1.0, abs=1e-4), name


def test_peft_combinations_report_how_far_they_are_from_the_weighted_sum(tmp_path, lm_runs, capsys):
    a, b = (run / "adapter" for run in lm_runs)
    code, _ = cli("merge", [a, a, "--combination", "linear", "--out", tmp_path / "aa"], capsys)
    report = json.loads((tmp_path / "aa" / "merge_report.json").read_text())
    assert code == 0 and report["max_abs_diff_merged_vs_unmerged"] < 1e-3 * report["logit_scale"]  # its own merge: exact
    assert report["max_abs_diff_merged_vs_weighted_sum"] > 0.05 * report["logit_scale"]  # but not Σ wᵢ·ΔWᵢ: said so
    code, err = cli("merge", [a, b, "--combination", "linear", "--out", tmp_path / "ab"], capsys)  # ranks 8 and 4
    assert code == 2 and "same r value" in err and "--combination sum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ab").exists()


# --- merged vs trained, like with like ---------------------------------------------------------------------------

def test_merge_hook_compares_with_the_trained_model_outside_autocast(tmp_path):
    """Trained under bf16 autocast, the merge is compared with the trained weights computing in fp32, as the merged
    model does: the difference is fp32 rounding, held to the fp32 tolerance, not bf16's rounding."""
    run_dir, summary = run_inprocess(tmp_path, *TINY_LM, "train.mixed_precision=bf16", "train.max_steps=3",
                                     "hooks=[save_adapter,merge]")
    m = summary["merge"]
    assert summary["precision"] == "bf16"
    assert m["tolerance_vs_trained"] == pytest.approx(1e-3 * m["logit_scale"])
    assert m["max_abs_diff_merged_vs_trained"] < 1e-4 * m["logit_scale"]


def test_logits_of_a_model_prepared_for_bf16_are_its_fp32_logits(lm_runs):
    """logits() calls the forward accelerate wrapped in autocast unwrapped, leaving the model as it was; a reference
    that is not the trained model is still refused."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM

    from conftest import compose
    from lorafit.merge import logits, merge_and_verify, merge_base
    from lorafit.models import resolve

    probe = {"input_ids": torch.randint(5, 500, (2, 12), generator=torch.Generator().manual_seed(0))}
    fp32 = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    AcceleratorState._reset_state()  # lm_runs may have just set up accelerate's singleton for an fp32 run
    prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")))
    with torch.no_grad():
        autocast = prepared(**probe).logits.float()
    assert torch.equal(logits(prepared, probe), logits(fp32, probe)) and not torch.equal(autocast, logits(fp32, probe))
    assert torch.equal(prepared(**probe).logits.float(), autocast)  # the prepared model still runs as prepared
    cfg = compose(*TINY_LM)
    with pytest.raises(UserError, match="the merged model and the trained model differ"):
        merge_and_verify(merge_base(cfg, None, "fp32"), [lm_runs[0] / "adapter"], Path("/nonexistent/m"), probe, cfg,
                         reference=prepared)


# --- analyze --compare -------------------------------------------------------------------------------------------

def test_analyze_compare_keeps_adapters_that_share_a_folder_name(tmp_path, lm_runs, capsys):
    for sweep, run in zip("AB", lm_runs):  # as multirun/<sweep>/0/adapter
        shutil.copytree(run / "adapter", tmp_path / "multirun" / sweep / "0" / "adapter")
    others = [tmp_path / "multirun" / s / "0" / "adapter" for s in "AB"]
    code, err = cli("analyze", [lm_runs[0], "--compare", *others, "--no-plots", "--out", tmp_path / "an"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "an" / "spectrum.json").read_text())
    assert all(set(m["phi"]) == {"A-0", "B-0"} for m in doc["modules"])
    assert len(doc["modules"][0]["phi"]["B-0"][0]) == 4  # B's rank: the second adapter, not the first twice
