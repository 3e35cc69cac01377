"""Speed levers stay exact, and the throughput benchmark cannot rot."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, compose

from lorafit.train import epoch_order, loss_sum


def test_padded_batch_losses_equal_each_row_alone():
    """Grouping only changes which rows share a batch; with right padding and the mask, no row sees another."""
    from transformers import AutoModelForCausalLM

    from lorafit.data import collate
    from lorafit.models import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (5, 17, 33, 9):
        ids = torch.randint(5, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": ids})
    with torch.no_grad():
        together, counts = loss_sum(model, collate(rows, pad_id=0), "causal_lm")
        alone = [loss_sum(model, collate([r], pad_id=0), "causal_lm") for r in rows]
    assert counts.tolist() == [n - 1 for n in (5, 17, 33, 9)]
    assert torch.allclose(together, torch.cat([a[0] for a in alone]), rtol=1e-5, atol=1e-5)


def test_length_grouped_order_is_a_deterministic_grouped_permutation():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 500, (1000,), generator=g).tolist()
    order = epoch_order(1000, 8, seed=3, lengths=lengths)
    assert order == epoch_order(1000, 8, seed=3, lengths=lengths)  # resume recomputes the same order
    assert len(order) == 1000 and len(set(order)) == 1000  # 1000 = 125 full batches: nothing dropped
    spread = lambda o: sum(max(lengths[i] for i in o[k:k + 8]) - min(lengths[i] for i in o[k:k + 8]) for k in range(0, 1000, 8))
    assert spread(order) < 0.2 * spread(epoch_order(1000, 8, seed=3))  # far less padding than a random order
    assert epoch_order(1000, 8, seed=4, lengths=lengths) != order


def test_group_by_length_trains_and_resumes_bitwise(tmp_path, write_jsonl):
    from conftest import TINY_LM, run_inprocess

    from safetensors.torch import load_file

    rows = [{"prompt": "word " * (i % 37 + 1), "response": f"answer {i}"} for i in range(64)]
    train, ev = write_jsonl("t.jsonl", rows), write_jsonl("e.jsonl", rows[:8])
    common = [*TINY_LM, "data=sft", f"data.train_file={train}", f"data.eval_file={ev}", "data.group_by_length=true",
              "train.max_steps=12", "train.save_every=4", "lora.dropout=0.1", "hooks=[save_adapter]"]
    full, _ = run_inprocess(tmp_path / "a", *common)
    cut, _ = run_inprocess(tmp_path / "b", *common)
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step_12")
    shutil.rmtree(cut / "checkpoints" / "step_8")
    from lorafit.run import run

    run(compose(*common, "train.resume=auto"), run_dir=cut)
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_dropout_override_reaches_the_model():
    from lorafit.models import build_model

    model = build_model(compose("model=tiny-bert", "model.dropout=0.0"), ["a", "b"])
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert build_model(compose("model=tiny-bert", "model.dropout=null"), ["a", "b"]).config.hidden_dropout_prob == 0.1


def test_throughput_benchmark_runs_in_tiny_mode(capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import throughput

    rows = throughput.main(["--tiny", "--pairs", "1", "--steps-a", "3", "--steps-b", "3"])
    assert {(r["job"], r["mode"]) for r in rows} == {("a", "defaults"), ("a", "equal"), ("b", "defaults")}
    for r in rows:
        assert r["samples_per_s"] > 0 and r["rss"] > 0 and r["runs"]["peer"][0]["eval"][r["metric"]] > 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "python -m lorafit --cfg job" in out
