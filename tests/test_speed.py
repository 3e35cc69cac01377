"""Speed levers stay exact, and the throughput benchmark cannot rot."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import REPO, compose

from lorafit.objectives import loss_sum
from lorafit.train import epoch_order


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


def _sft_rows(lengths, prompt_len=lambda n: n // 2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt_len(n) + ids[prompt_len(n):]})
    return rows


def test_packed_batch_gives_the_padded_batch_logits_and_loss():
    """Packing is exact: attention stays inside each row, positions restart, and no row's first token is a target."""
    from transformers import AutoModelForCausalLM

    from lorafit.data import collate
    from lorafit.models import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama")).eval()
    lengths = (5, 17, 33, 9)
    rows = _sft_rows(lengths)
    packed = collate(rows, pad_id=0, pack=True)
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        for r, a, b in zip(rows, starts, starts[1:]):  # each row alone, no padding at all
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            assert torch.allclose(logits[a:b], alone, rtol=1e-5, atol=1e-5)
        loss_packed, n_packed = loss_sum(model, packed, "causal_lm")
        loss_padded, n_padded = loss_sum(model, collate(rows, pad_id=0), "causal_lm")
    assert n_packed.sum() == n_padded.sum() == sum(n - n // 2 for n in lengths)
    assert torch.allclose(loss_packed.sum(), loss_padded.sum(), rtol=1e-6)


def test_lm_head_on_target_positions_only_gives_the_full_loss_and_gradient():
    """loss_sum sends only target positions through the LM head; the loss and LoRA gradients are the full ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.data import collate
    from lorafit.models import resolve
    from lorafit.objectives import _takes_logit_mask

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert _takes_logit_mask(model)
    batch = collate(_sft_rows((12, 30, 7), prompt_len=lambda n: n - 3), pad_id=0)

    def full_loss():  # the plain way: logits everywhere, cross-entropy with ignore_index
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="sum")

    grads = []
    for compute in (lambda: loss_sum(model, batch, "causal_lm")[0].sum(), full_loss):
        model.zero_grad()
        loss = compute()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-6)
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(g1, g2))  # float32 summation order only
    assert loss_sum(model, batch, "causal_lm")[1].tolist() == [3, 3, 3]


def test_packed_training_matches_padded_training(tmp_path, write_jsonl):
    from conftest import TINY_LM, run_inprocess

    from safetensors.torch import load_file

    rows = [{"prompt": "word " * (i % 23 + 1), "response": f"answer {i}"} for i in range(48)]
    train, ev = write_jsonl("t.jsonl", rows), write_jsonl("e.jsonl", rows[:8])
    common = [*TINY_LM, "data=sft", f"data.train_file={train}", f"data.eval_file={ev}", "train.max_steps=4",
              "train.lr=1e-3", "hooks=[save_adapter]"]
    (padded, sp), (packed, sk) = (run_inprocess(tmp_path / d, *common, f"data.packing={d == 'packed'}")
                                  for d in ("padded", "packed"))
    assert abs(sp["eval"]["loss"] - sk["eval"]["loss"]) < 1e-5
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (padded, packed))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    per_sample = lambda s: s["tokens_per_s"] / s["samples_per_s"]  # the same rows and non-pad tokens counted
    assert per_sample(sk) == pytest.approx(per_sample(sp), rel=1e-9)


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
              "train.max_steps=12", "train.save_every=4", "train.keep_checkpoints=3", "lora.dropout=0.1", "hooks=[save_adapter]"]
    full, _ = run_inprocess(tmp_path / "a", *common)
    cut, _ = run_inprocess(tmp_path / "b", *common)
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step_12")
    shutil.rmtree(cut / "checkpoints" / "step_8")
    from lorafit.run import run

    run(compose(*common, "train.resume=auto"), run_dir=cut)  # from step 4 (with 2 kept there was none: a fresh start)
    assert (cut / "checkpoints" / "step_8").is_dir()
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
    assert {(r["job"], r["mode"]) for r in rows} == {(j, m) for j in "ab" for m in ("defaults", "equal")}
    for r in rows:
        assert r["samples_per_s"] > 0 and r["rss"] > 0 and r["runs"]["peer"][0]["eval"][r["metric"]] > 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "python -m lorafit --cfg job" in out


def test_precision_benchmark_runs_both_precisions_in_tiny_mode():
    sys.path.insert(0, str(REPO / "bench"))
    import precision

    rows = precision.main(["--tiny", "--jobs", "a"])
    runs = rows[0]["runs"]
    assert [x["precision"] for x in runs["fp32"] + runs["bf16"]] == ["fp32", "bf16"]
    assert rows[0]["speedup"] > 0 and all(0 < x["mfu"] for x in runs["fp32"] + runs["bf16"])


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_drops_p_and_stays_unbiased(p):
    from lorafit.speed import fast_dropout

    torch.manual_seed(0)
    x = torch.randn(400_000, requires_grad=True)
    y = fast_dropout(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536  # binomial noise + the 1/65536 rounding
    kept = y != 0
    scale = (y[kept] / x[kept]).detach()
    assert torch.allclose(scale, torch.full_like(scale, 1 / (1 - round(p * 65536) / 65536)))  # E[y] = x
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.where(kept, scale[0], 0.0))  # the same mask in backward
    again = lambda: (torch.manual_seed(1), fast_dropout(x.detach(), p))[1]
    assert torch.equal(again(), again())  # seeded like any torch op (resume relies on it)
    assert torch.equal(fast_dropout(x, p, training=False), x) and torch.equal(fast_dropout(x, 0.0), x)


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_fast_dropout_attention_is_sdpa_attention(model_name):
    """With the drop probability rounding to 0, the training path (math attention, our masks) equals torch's sdpa:
    padding masks, causal masks and grouped-query heads handled alike. In eval it is sdpa itself."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorafit import speed
    from lorafit.models import resolve

    if model_name == "tiny-llama":
        model = AutoModelForCausalLM.from_pretrained(resolve(model_name), attention_dropout=1e-6)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(model_name), attention_probs_dropout_prob=1e-6, hidden_dropout_prob=0.0)
    ids = torch.randint(5, 900, (3, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 7:] = 0
    full = torch.ones_like(ids)  # no padding: transformers passes no mask, and causal models rely on is_causal
    outs = {}
    for impl in ("sdpa", "fast"):
        if impl == "fast":
            speed.install(model)
            assert model.config._attn_implementation == speed.ATTENTION
        for train in (True, False):
            model.train(train)
            for name, m in (("padded", mask), ("full", full)):
                outs[impl, train, name] = model(input_ids=ids, attention_mask=m).logits.detach()
    keep = mask.bool() if model_name == "tiny-llama" else slice(None)  # padded positions' logits are arbitrary
    for train in (True, False):
        assert torch.allclose(outs["fast", train, "padded"][keep], outs["sdpa", train, "padded"][keep], atol=1e-5)
        assert torch.allclose(outs["fast", train, "full"], outs["sdpa", train, "full"], atol=1e-5)


def test_fast_dropout_is_installed_by_default_and_can_be_turned_off(tmp_path):
    from conftest import TINY_CLS, run_inprocess

    from lorafit import speed

    seen = []
    orig = speed.install

    def spy(model, fast_dropout=True):
        seen.append((orig(model, fast_dropout), model.config._attn_implementation))
        return model

    speed.install = spy
    try:
        run_inprocess(tmp_path / "on", *TINY_CLS, "train.max_steps=2", "lora.dropout=0.1", "hooks=[]")
        run_inprocess(tmp_path / "off", *TINY_CLS, "train.max_steps=2", "lora.dropout=0.1", "hooks=[]",
                      "model.fast_dropout=false")
    finally:
        speed.install = orig
    (on, on_attention), (off, off_attention) = seen
    assert any(isinstance(m, speed.FastDropout) for m in on.modules()) and on_attention == speed.ATTENTION
    # off: torch's own dropout layers, and the attention passes dropout to torch's sdpa
    assert not any(isinstance(m, speed.FastDropout) for m in off.modules())
    assert off_attention == speed.ATTENTION_TORCH_DROPOUT


def _tiny(model_name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lorafit.models import resolve

    torch.manual_seed(0)
    if model_name == "tiny-llama":
        return AutoModelForCausalLM.from_pretrained(resolve(model_name), tie_word_embeddings=True)
    return AutoModelForSequenceClassification.from_pretrained(resolve(model_name), num_labels=3)


@pytest.mark.parametrize("model_name,dora", [("tiny-bert", False), ("tiny-llama", False), ("tiny-bert", True)])
def test_frozen_weights_in_bf16_change_no_bit_under_autocast_and_come_back(model_name, dora):
    """Autocast casts each frozen fp32 Linear weight to bf16 at every forward; holding it in bf16 instead gives the
    same logits and LoRA gradients bit for bit. On exit the fp32 originals are back, bitwise. A tied LM head is
    left alone (its embedding lookup is not autocast), and so are DoRA's base weights (it takes their norms)."""
    from peft import LoraConfig, get_peft_model

    from lorafit import speed

    targets = ["q_proj", "v_proj"] if model_name == "tiny-llama" else ["query", "value"]
    model = get_peft_model(_tiny(model_name), LoraConfig(r=4, target_modules=targets, init_lora_weights="gaussian",
                                                         use_dora=dora))
    for n, p in model.named_parameters():  # B = 0 at init would make the LoRA gradients of A trivially zero
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(5, 900, (2, 17), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids).logits.float()
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = step()
    with speed.frozen_weights_in(model, "bf16"):
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        logits, grads = step()
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    adapted = [n for n in dtypes if "base_layer.weight" in n]
    other = [n for n in dtypes if "dense.weight" in n or "mlp.up_proj.weight" in n]
    assert adapted and all(dtypes[n] == (torch.float32 if dora else torch.bfloat16) for n in adapted)
    assert other and all(dtypes[n] == torch.bfloat16 for n in other)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "lora_" in n or "embed" in n or "norm" in n.lower())
    if model_name == "tiny-llama":  # tied: lm_head.weight is the embedding, which stays fp32
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert model.get_output_embeddings().weight.dtype == torch.float32
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in model.named_parameters())
    with speed.frozen_weights_in(model, "no"):  # fp32 runs change nothing
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_cpu_attention_under_bf16_autocast_runs_in_fp32_where_it_is_differentiated(model_name, monkeypatch):
    """Under bf16 autocast on CPU, attention that backward will go through gets torch's sdpa on the (exactly) upcast
    fp32 inputs, its output rounded back to bf16 once; forward-only attention keeps torch's bf16 kernel."""
    import torch.nn.functional as F

    from lorafit import speed

    model = speed.install(_tiny(model_name)).eval()
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.dtype if not torch.is_autocast_enabled("cpu") else torch.bfloat16)  # what the kernel runs in
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(5, 900, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert seen and set(seen) == {torch.bfloat16}
    q, k, v = (torch.randn(2, 4, 13, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bool_mask = torch.ones(2, 1, 13, 13, dtype=torch.bool).tril()
    layer = torch.nn.Module()  # an attention layer without grouped heads
    layer.is_causal = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = speed.attention(layer, q, k, v, bool_mask, scaling=0.35)
    expected = sdpa(q.float(), k.float(), v.float(), attn_mask=bool_mask, scale=0.35).transpose(1, 2).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
