"""lora.r=auto: train at r_max, shrink every adapter to its exact truncation inside the run, train on at those ranks."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import TINY_CLS, TINY_LM, metrics_lines, run_cli, run_inprocess
from safetensors.torch import load_file

from lorafit import autorank
from lorafit.analysis.spectrum import energy_rank, lowrank_svd


def live_lora(betas=(0.9, 0.999), lr=1e-2, steps=3):
    """A tiny-llama with LoRA r=8 on every Linear (random B, so every ΔW is full rank), an accelerate-prepared AdamW
    that has taken `steps` steps, and the batch it trained on."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"input_ids": torch.randint(0, 500, (4, 16))}
    batch["labels"] = batch["input_ids"]
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, accelerator, batch


def dense(model) -> dict[str, torch.Tensor]:
    return {name: s * B.detach().double() @ A.detach().double() for name, A, B, s in autorank.lora_pairs(model)}


def test_the_shrink_drops_exactly_the_tail_energy_and_the_dropped_directions_stay_zero():
    model, optimizer, accelerator, batch = live_lora()
    before = dense(model)
    spectra = {name: lowrank_svd(B, A, s) for name, A, B, s in autorank.lora_pairs(model)}
    record = autorank.shrink(model, optimizer, accelerator, energy=0.7, moments="project")
    after = dense(model)
    assert len(record["modules"]) == len(before) == 14  # 2 layers x 7 Linears
    for m in record["modules"]:
        name, S = m["name"], spectra[m["name"]]
        assert m["k"] == energy_rank(S, 0.7) < m["r"] == 8
        tail = float((S[m["k"]:] ** 2).sum())
        assert m["tail_energy"] == pytest.approx(tail, rel=1e-9)
        # Eckart–Young on the live model: what the function lost is exactly the dropped tail, at the shrink step
        assert float((before[name] - after[name]).detach().norm() ** 2) == pytest.approx(tail, rel=1e-5)
        assert torch.linalg.matrix_rank(after[name]).item() == m["k"]
    assert record["params_after"] < record["params_before"]
    pairs = autorank.lora_pairs(model)
    kept = {name: (A.detach().clone(), B.detach().clone()) for name, A, B, _ in pairs}
    for _ in range(3):  # training goes on: the kept directions move, the dropped ones stay exactly zero
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, A, B, _ in autorank.lora_pairs(model):
        k = record["ranks"][name]
        assert A[k:].count_nonzero() == 0 and B[:, k:].count_nonzero() == 0
        assert not torch.equal(A[:k], kept[name][0][:k]) and not torch.equal(B[:, :k], kept[name][1][:, :k])
        for p, dropped in ((A, lambda t: t[k:]), (B, lambda t: t[:, k:])):
            state = optimizer.optimizer.state[p]
            assert dropped(state["exp_avg"]).count_nonzero() == 0 and dropped(state["exp_avg_sq"]).count_nonzero() == 0


def test_the_first_moment_is_mapped_to_the_gradient_in_the_new_factors():
    """With beta1 = 0 and lr = 0, Adam's first moment is the last gradient, and the weights stay put. A shrink that
    keeps every rank (energy 1) changes only the factorization: the gradient taken in the new factors, on the same
    batch, must be the mapped moment (∂L/∂B' = ∂L/∂B·Nᵀ, ∂L/∂A' = Mᵀ·∂L/∂A)."""
    model, optimizer, accelerator, batch = live_lora(betas=(0.0, 0.0), lr=0.0, steps=1)
    before = dense(model)
    autorank.shrink(model, optimizer, accelerator, energy=1.0, moments="project")
    for name, after in dense(model).items():
        assert torch.allclose(after, before[name], atol=1e-6)  # the same function
    model(**batch).loss.backward()
    for _, A, B, _ in autorank.lora_pairs(model):
        for p in (A, B):
            m = optimizer.optimizer.state[p]["exp_avg"]
            assert torch.allclose(m, p.grad, atol=1e-4 * p.grad.abs().max()), (m - p.grad).abs().max()


def test_reset_zeroes_the_moments_and_restarts_adam_and_warms_up():
    model, optimizer, accelerator, _ = live_lora()
    autorank.shrink(model, optimizer, accelerator, energy=0.7, moments="reset")
    for _, A, B, _ in autorank.lora_pairs(model):
        for p in (A, B):
            state = optimizer.optimizer.state[p]
            assert state["exp_avg"].count_nonzero() == 0 and state["exp_avg_sq"].count_nonzero() == 0
            assert state["step"].item() == 0
    assert [autorank.warmup_factor(s, 3, 4) for s in (3, 4, 7, 8)] == [1.0, 0.2, 0.8, 1.0]


AUTO = [*TINY_CLS, "train.max_steps=12", "lora.r=auto", "lora.r_max=8", "lora.alpha=16", "lora.auto_energy=0.8",
        "lora.auto_shrink_at=0.25"]


def test_auto_trains_big_shrinks_at_its_step_and_ships_the_small_adapter(tmp_path):
    """One run: r=8 until step ceil(12 · 0.25) = 3, then the truncation; the saved adapter (plain peft) is the model
    the run trained after the shrink, its ranks and step are in summary.json and the report, and the merge is exact."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.models import resolve

    run_dir, summary = run_inprocess(tmp_path, *AUTO, "train.save_every=12", "hooks=[save_adapter,spectrum,merge]",
                                     "hooks.spectrum.plots=false")
    auto = summary["auto_rank"]
    assert auto["step"] == 3 and auto["r_max"] == 8 and auto["moments"] == "project"
    assert all(1 <= k < 8 for k in auto["ranks"].values())
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == auto["ranks"]
    assert all(config["alpha_pattern"][n] / k == 2.0 for n, k in auto["ranks"].items())  # r_max's scale, 16 / 8
    lora = sum(k * sum(m["shape"]) for m, k in zip(auto["modules"], auto["ranks"].values()))
    assert lora == auto["params_after"] < auto["params_before"]
    assert summary["trainable_params"] < summary["trainable_params_while_training"]
    assert summary["trainable_params_while_training"] - summary["trainable_params"] == auto["params_before"] - lora
    report = (run_dir / "analysis" / "report.md").read_text()
    assert "Ranks chosen in the run (lora.r=auto)" in report and "until step 3" in report
    assert summary["merge"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    # The last checkpoint holds the r_max-shaped tensors the loop trained; plain peft with the shipped small adapter
    # computes the same logits.
    tok = AutoTokenizer.from_pretrained(run_dir / "adapter")
    batch = tok(["the cat sat on the mat", "stocks fell sharply"], return_tensors="pt", padding=True)
    small = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=3),
                                      run_dir / "adapter").eval()
    from peft import LoraConfig, get_peft_model

    big = get_peft_model(AutoModelForSequenceClassification.from_pretrained(resolve("tiny-bert"), num_labels=3),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    missing, unexpected = big.load_state_dict(load_file(run_dir / "checkpoints" / "step_12" / "model.safetensors"), strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k or "modules_to_save" in k]
    with torch.no_grad():
        assert torch.allclose(small(**batch).logits, big.eval()(**batch).logits, atol=1e-5)


RESUMABLE = [*AUTO, "train.max_steps=10", "train.save_every=2", "train.keep_checkpoints=5", "lora.dropout=0.1",
             "hooks=[save_adapter]"]


@pytest.mark.parametrize("moments", ["project", "reset"])
def test_a_run_killed_before_or_after_the_shrink_resumes_bitwise(tmp_path, moments):
    args = [*RESUMABLE, f"lora.auto_moments={moments}", "lora.auto_warmup=3"]
    full = run_cli(*args, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]
    assert "step 3: lora.r=auto shrank 4 modules" in full.stdout + full.stderr
    want = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    for fault, start in (("step:3", 2), ("step:5", 4)):  # killed just at the shrink step, and after it
        run_dir = tmp_path / fault.replace(":", "")
        crashed = run_cli(*args, f"hydra.run.dir={run_dir}", env={"LORAFIT_FAULT": fault})
        assert crashed.returncode == -signal.SIGKILL
        resumed = run_cli(*args, "train.resume=auto", f"hydra.run.dir={run_dir}")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"at step {start}/10" in resumed.stdout
        got = load_file(run_dir / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), fault
        assert metrics_lines(run_dir) == metrics_lines(tmp_path / "full")
        assert json.loads((run_dir / "summary.json").read_text())["auto_rank"] == \
            json.loads((tmp_path / "full" / "summary.json").read_text())["auto_rank"]


def test_auto_settings_it_cannot_honour_are_refused_in_one_line(tmp_path):
    out = run_cli(*AUTO, "lora.use_dora=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "lora.r=auto truncates plain LoRA factors" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "summary.json").exists()
    out = run_cli(*AUTO, "lora.auto_moments=keep", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "expected one of [project, reset]" in out.stderr and "full_key: lora.auto_moments" in out.stderr


def test_an_embedding_target_is_refused_before_training(tmp_path):
    """peft keeps an Embedding's LoRA factors apart; auto shrinks Linear layers only, and says so before step 1."""
    from lorafit.errors import UserError

    with pytest.raises(UserError, match="embed_tokens is an Embedding"):
        run_inprocess(tmp_path, *TINY_LM, "train.max_steps=4", "lora.r=auto", "lora.r_max=8",
                      "lora.target_modules='.*(embed_tokens|q_proj)'")  # a regex: a list of names must be Linear
    log = tmp_path / "run" / "metrics.jsonl"
    assert not log.exists() or "train/loss" not in log.read_text()
