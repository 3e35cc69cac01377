"""Preference tuning (objective=dpo|ipo|simpo|orpo|kto on data=preference): each loss against a hand computation,
the reply-only mask, both references (the adapter switched off; lora.init_from's frozen adapter), precomputed
reference log-probabilities, 2 processes and a resumed run equal to one uninterrupted process, the reward metrics,
and one-line config errors."""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import KEYWORDS, cli_run_dir, compose, metrics_lines, run_cli, run_inprocess
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lorafit import objectives
from lorafit.config import ObjectiveConfig

DATA = Path(__file__).resolve().parent / ".data"


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """Keyword-topic pairs a tiny random model learns to rank in a few steps: the prompt holds the topic's words,
    chosen is that topic's name, rejected another topic's."""
    rng, topics = random.Random(seed), list(KEYWORDS)
    filler = "the a of and to in is was for on with as by at from this that".split()
    rows = []
    for i in range(n):
        topic = topics[i % 3]
        words = rng.sample(filler, 3) + KEYWORDS[topic].split()
        rng.shuffle(words)
        rows.append({"prompt": "Topic: " + " ".join(words), "chosen": topic,
                     "rejected": topics[(i + 1 + rng.randrange(2)) % 3]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS_TRAIN = write_pairs(DATA / "pairs_train.jsonl", 48, 0)
PAIRS_EVAL = write_pairs(DATA / "pairs_eval.jsonl", 23, 1)  # 23 pairs: over 2 processes, the last batch is padded
PREF = ["model=tiny-llama", "data=preference", "objective=dpo", f"data.train_file={PAIRS_TRAIN}",
        f"data.eval_file={PAIRS_EVAL}", "train.mixed_precision=no", "lora.r=8", "lora.alpha=16",
        "lora.target_modules=all-linear", "data.max_length=64", "train.batch_size=4", "train.eval_batch_size=8",
        "train.log_every=1", "train.eval_every=0", "train.lr=1e-2", "hooks=[save_adapter]"]


# ---- the losses, by hand ---------------------------------------------------------------------------------------------

def _objective(name: str, **keys):
    return OmegaConf.structured(ObjectiveConfig(name=name, **keys))


def _t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two pairs: summed log-probabilities of the chosen / rejected replies under the policy and the reference, and their
# token counts. Log-ratios: chosen +0.5, -1.0; rejected -1.0, +0.5.
POL_C, POL_R, REF_C, REF_R, N_C, N_R = _t(-3.0, -5.0), _t(-4.0, -2.0), _t(-3.5, -4.0), _t(-3.0, -2.5), _t(2, 4), _t(3, 1)
PAIRS = (POL_C, POL_R, REF_C, REF_R, N_C, N_R)


def _close(got: torch.Tensor, expected: list[float]) -> bool:
    return torch.allclose(got, _t(*expected), atol=1e-12, rtol=0)


def test_dpo_loss_with_label_smoothing_is_the_hand_computed_one():
    # h = chosen log-ratio - rejected log-ratio = (0.5 - -1.0, -1.0 - 0.5) = (1.5, -1.5); beta*h = (0.75, -0.75)
    losses, chosen, rejected = objectives.dpo(*PAIRS, _objective("dpo", beta=0.5))
    assert _close(losses, [math.log1p(math.exp(-0.75)), math.log1p(math.exp(0.75))])
    assert _close(chosen, [0.25, -0.5]) and _close(rejected, [-0.5, 0.25])  # beta * log-ratio
    # cDPO: 20% of the pairs assumed flipped
    losses, _, _ = objectives.dpo(*PAIRS, _objective("dpo", beta=0.5, label_smoothing=0.2))
    assert _close(losses, [-0.8 * logsig(0.75) - 0.2 * logsig(-0.75), -0.8 * logsig(-0.75) - 0.2 * logsig(0.75)])


def test_ipo_loss_is_the_hand_computed_one():
    # length-averaged log-ratios: h = (0.5/2 - -1.0/3, -1.0/4 - 0.5/1) = (7/12, -3/4); target 1/(2*0.5) = 1
    losses, chosen, rejected = objectives.ipo(*PAIRS, _objective("ipo", beta=0.5))
    assert _close(losses, [(7 / 12 - 1) ** 2, (-3 / 4 - 1) ** 2])
    assert _close(chosen, [0.25, -0.5]) and _close(rejected, [-0.5, 0.25])  # DPO's implicit rewards


def test_simpo_loss_with_gamma_and_label_smoothing_is_the_hand_computed_one():
    # rewards beta * average log-prob: chosen 2*(-3/2, -5/4) = (-3, -2.5), rejected 2*(-4/3, -2/1) = (-8/3, -4)
    # h = chosen - rejected - gamma = (-3 + 8/3 - 0.5, -2.5 + 4 - 0.5) = (-5/6, 1)
    losses, chosen, rejected = objectives.simpo(*PAIRS, _objective("simpo", beta=2.0, gamma=0.5))
    assert _close(losses, [-logsig(-5 / 6), -logsig(1.0)])
    assert _close(chosen, [-3.0, -2.5]) and _close(rejected, [-8 / 3, -4.0])
    losses, _, _ = objectives.simpo(*PAIRS, _objective("simpo", beta=2.0, gamma=0.5, label_smoothing=0.1))
    assert _close(losses, [-0.9 * logsig(-5 / 6) - 0.1 * logsig(5 / 6), -0.9 * logsig(1.0) - 0.1 * logsig(-1.0)])
    # gamma is the target margin: without it, h = (-1/3, 1.5)
    losses, _, _ = objectives.simpo(*PAIRS, _objective("simpo", beta=2.0, gamma=0.0))
    assert _close(losses, [-logsig(-1 / 3), -logsig(1.5)])


def test_orpo_loss_is_the_hand_computed_one():
    # average log-probs c = (-1.5, -1.25), r = (-4/3, -2); log odds(p) = log p - log(1 - p) with log p = c or r
    c, r = [-1.5, -1.25], [-4 / 3, -2.0]
    odds = [(ci - math.log(1 - math.exp(ci))) - (ri - math.log(1 - math.exp(ri))) for ci, ri in zip(c, r)]
    losses, chosen, rejected = objectives.orpo(*PAIRS, _objective("orpo", beta=0.1))
    assert _close(losses, [-ci - 0.1 * logsig(o) for ci, o in zip(c, odds)])  # chosen NLL per token + odds-ratio term
    assert _close(chosen, [0.1 * x for x in c]) and _close(rejected, [0.1 * x for x in r])


def test_kto_loss_and_reference_point_are_the_hand_computed_ones():
    from accelerate import Accelerator

    pol, ref, desirable = _t(-3.0, -5.0, -4.0), _t(-3.5, -4.0, -3.0), torch.tensor([True, False, True])
    o = _objective("kto", beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    # log-ratios (0.5, -1, -1); z = 0.2: desirable rows 1 - sig(beta (x - z)), undesirable 2 (1 - sig(beta (z - x)))
    losses, reward = objectives.kto(pol, ref, desirable, o, torch.tensor(0.2, dtype=torch.float64))
    assert _close(losses, [1 - sig(0.5 * 0.3), 2 * (1 - sig(0.5 * 1.2)), 1 - sig(0.5 * -1.2)])
    assert _close(reward, [0.25, -0.5, -0.5])
    acc = Accelerator(cpu=True)
    # z: the rows' mean log-ratio, clamped at 0 and detached
    assert objectives.kto_reference_point(pol, ref, acc).item() == 0.0  # mean -0.5
    moved = _t(-3.0, -3.2).requires_grad_()
    z = objectives.kto_reference_point(moved, _t(-3.5, -4.0), acc)
    assert abs(z.item() - 0.65) < 1e-12 and not z.requires_grad


def test_sft_weight_adds_the_chosen_nll_per_token_to_the_pair_loss():
    """_pair_losses reads a pair batch as B chosen rows then B rejected; sft_weight adds w * (-chosen logp / tokens)."""
    pol, ref, n = torch.cat([POL_C, POL_R]), torch.cat([REF_C, REF_R]), torch.cat([N_C, N_R])
    losses, chosen, rejected = objectives._pair_losses(objectives.dpo, pol, ref, n, _objective("dpo", beta=0.5, sft_weight=0.3))
    assert _close(losses, [math.log1p(math.exp(-0.75)) + 0.3 * 1.5, math.log1p(math.exp(0.75)) + 0.3 * 1.25])
    assert _close(chosen, [0.25, -0.5]) and _close(rejected, [-0.5, 0.25])
    losses, _, _ = objectives._pair_losses(objectives.simpo, pol, ref, n,
                                          _objective("simpo", beta=2.0, gamma=0.5, sft_weight=2.0))
    assert _close(losses, [-logsig(-5 / 6) + 2 * 1.5, -logsig(1.0) + 2 * 1.25])


# ---- the reply-only mask ---------------------------------------------------------------------------------------------

def _tokenized(tmp_path, rows: list[dict], *overrides: str):
    from lorafit import data, models

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(*PREF, f"data.train_file={path}", f"data.eval_file={path}", "data.max_length=256", *overrides)
    tok = models.build_tokenizer(cfg.model)
    return tok, data.tokenize(data.load_splits(cfg), tok, cfg)[0]


def _split(tok, ids: list[int], labels: list[int]) -> tuple[str, str]:
    """(the unlabelled text, the labelled text) of a row, checking the labels are its ids on one final span."""
    first = next(i for i, l in enumerate(labels) if l != -100)
    assert all(l == -100 for l in labels[:first]) and labels[first:] == ids[first:]
    return tok.decode(ids[:first]), tok.decode(ids[first:])


# tiny-llama's chat template: "<|role|>\n" content "</s>\n" per turn; a reply ends with its end-of-turn "</s>\n"
def _turns(*turns: tuple[str, str]) -> str:
    return "".join(f"<|{role}|>\n{content}</s>\n" for role, content in turns)


def test_the_loss_falls_on_the_chosen_and_rejected_replies_only(tmp_path):
    rows = [{"prompt": "Name a fruit.", "chosen": "A ripe apple.", "rejected": "A rusty nail."},
            {"prompt": "Say hi.", "chosen": "Hello there!", "rejected": "Go away."}]
    tok, ds = _tokenized(tmp_path, rows)
    assert len(ds) == 2
    for row, enc in zip(rows, ds):
        prompt = _turns(("user", row["prompt"])) + "<|assistant|>\n"
        assert _split(tok, enc["input_ids"], enc["labels"]) == (prompt, row["chosen"] + "</s>\n")
        assert _split(tok, enc["rejected_input_ids"], enc["rejected_labels"]) == (prompt, row["rejected"] + "</s>\n")
    # KTO reads each pair as a desirable and an undesirable row, masked alike
    tok, ds = _tokenized(tmp_path, rows, "objective=kto")
    assert ds["kto_label"] == [1, 0, 1, 0]
    assert [_split(tok, r["input_ids"], r["labels"])[1] for r in ds] == [
        "A ripe apple.</s>\n", "A rusty nail.</s>\n", "Hello there!</s>\n", "Go away.</s>\n"]


def test_conversational_pairs_take_their_shared_turns_as_the_prompt(tmp_path):
    """No prompt column: chosen and rejected are whole conversations; the turns they share (a multi-turn prefix with
    an earlier assistant reply) are the prompt and carry no loss."""
    shared = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}]
    rows = [{"chosen": shared + [{"role": "assistant", "content": "A ripe apple."}],
             "rejected": shared + [{"role": "assistant", "content": "A rusty nail."}]}]
    tok, ds = _tokenized(tmp_path, rows)
    prompt = _turns(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name a fruit.")) + \
        "<|assistant|>\n"
    (enc,) = ds
    assert _split(tok, enc["input_ids"], enc["labels"]) == (prompt, "A ripe apple.</s>\n")
    assert _split(tok, enc["rejected_input_ids"], enc["rejected_labels"]) == (prompt, "A rusty nail.</s>\n")


# ---- the reference: the adapter switched off, or lora.init_from's adapter ---------------------------------------------

def reply_logps(model, batch) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens, the plain way (every position's logits, shifted)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    picked = logits[:, :-1].log_softmax(-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != -100)).sum(1)


def _base_model():
    from transformers import AutoModelForCausalLM

    from lorafit.models import resolve

    return AutoModelForCausalLM.from_pretrained(resolve("tiny-llama"), dtype=torch.float32).eval()


def _pair_setup(*overrides: str):
    """(config, tokenizer, eval split, a collated batch of 4 eval pairs = 8 rows, an accelerator)."""
    from accelerate import Accelerator

    from lorafit import data, models

    cfg = compose(*PREF, *overrides)
    tok = models.build_tokenizer(cfg.model)
    _, eval_ds = data.tokenize(data.load_splits(cfg), tok, cfg)
    batch = data.collate([eval_ds[i] for i in range(4)], tok.pad_token_id)
    return cfg, tok, eval_ds, batch, Accelerator(cpu=True)


def test_collate_puts_the_chosen_rows_first_then_the_rejected():
    _, _, eval_ds, batch, _ = _pair_setup()
    assert batch["input_ids"].shape[0] == 8
    for i in range(4):
        for rows, key in ((batch["input_ids"][i], "input_ids"), (batch["input_ids"][4 + i], "rejected_input_ids")):
            assert rows[: len(eval_ds[i][key])].tolist() == eval_ds[i][key]


def test_the_reference_is_the_base_model_without_the_adapter():
    from lorafit import adapters, models

    cfg, _, _, batch, acc = _pair_setup()
    model = adapters.attach_lora(models.build_model(cfg), cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # as if trained: the policy moves away from the base
            p.data.normal_(0, 0.5)
    base = reply_logps(_base_model(), batch)
    policy = reply_logps(model, batch)
    assert (policy - base).abs().max() > 0.5
    model.train()
    ref = objectives.reference_logps(model, batch, acc)
    assert torch.allclose(ref, base, atol=1e-4, rtol=0) and not ref.requires_grad
    # after the block: the adapter is on again, and the model back in training mode
    assert model.training and torch.allclose(objectives.sequence_logps(model, batch)[0], policy, atol=1e-4, rtol=0)


def test_an_untrained_policy_is_its_reference_so_every_margin_is_zero():
    from lorafit import adapters, data, models

    cfg, tok, eval_ds, batch, acc = _pair_setup()
    model = adapters.attach_lora(models.build_model(cfg), cfg)  # LoRA's B starts at 0
    assert torch.equal(objectives.sequence_logps(model, batch)[0], objectives.reference_logps(model, batch, acc))
    batches = data.loader(eval_ds, 8, list(range(len(eval_ds))), tok.pad_token_id, acc, False)
    ev = objectives.build(cfg, acc).evaluate(model, batches, 0)
    assert ev["n"] == 23 and ev["reward_margin"] == 0.0 and ev["reward_accuracy"] == 0.0 and ev["kl"] == 0.0
    assert abs(ev["loss"] - math.log(2)) < 1e-6  # -log sigmoid(0), in float32
    assert ev["chosen_logp"] < 0 and ev["rejected_logp"] < 0


# ---- runs: one uninterrupted DPO run, reused --------------------------------------------------------------------------

# A constant lr of 1e-2: reward accuracy peaks at step 4 of 6 (1.0, then 0.91), so save_best has an earlier best to put back
RUN = [*PREF, "train.max_steps=6", "train.save_every=2", "train.eval_every=2", "train.save_best=true",
       "lora.dropout=0.1", "train.lr=1e-2", "train.scheduler=constant", "train.warmup_ratio=0"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return cli_run_dir(tmp_path_factory, *RUN)


def test_a_dpo_run_is_judged_by_reward_accuracy_and_save_best_keeps_its_best(dpo_run):
    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["primary_metric"] == "reward_accuracy" and summary["objective"] == "dpo"
    lines = metrics_lines(dpo_run)
    evals = {l["step"]: {k[5:]: v for k, v in l.items() if k.startswith("eval/")} for l in lines if "eval/kl" in l}
    assert sorted(evals) == [2, 4, 6]
    accs = [evals[s]["reward_accuracy"] for s in (2, 4, 6)]
    best = (2, 4, 6)[accs.index(max(accs))]  # the first evaluation at the top (a tie is no improvement)
    assert summary["best_step"] == summary["adapter_step"] == best < 6, accs
    assert summary["eval"] == evals[best] and summary["eval"]["reward_accuracy"] > 0.9
    kept = load_file(dpo_run / "checkpoints" / "best.safetensors")
    saved = load_file(dpo_run / "adapter" / "adapter_model.safetensors")
    assert kept.keys() == {k.replace(".weight", ".default.weight") for k in saved}
    assert all(torch.equal(kept[k.replace(".weight", ".default.weight")], saved[k]) for k in saved)
    # KL(policy || reference) per token is >= 0, and > 0 once the policy has moved
    assert all(e["kl"] > 0 for e in evals.values())
    # train/reward_margin at every step; at step 1 the policy is still the reference: every margin 0, loss log 2
    train = [l for l in lines if "train/loss" in l]
    assert [l["step"] for l in train] == [1, 2, 3, 4, 5, 6] and all("train/reward_margin" in l for l in train)
    assert train[0]["train/reward_margin"] == 0.0 and abs(train[0]["train/loss"] - math.log(2)) < 1e-6
    assert train[-1]["train/reward_margin"] > 0.5


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_bitwise(tmp_path, dpo_run):
    crashed = run_cli(*RUN, f"hydra.run.dir={tmp_path}", env={"LORAFIT_FAULT": "step:5"})
    assert crashed.returncode == -signal.SIGKILL and not (tmp_path / "adapter").exists()
    resumed = run_cli(*RUN, "train.resume=auto", f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 4/6" in resumed.stdout
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (dpo_run, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_lines(tmp_path) == metrics_lines(dpo_run)  # the reward margins and evals too, bitwise


# ---- lora.init_from: a trained adapter goes on training, its frozen copy is the reference ----------------------------

def test_init_from_makes_the_trained_adapter_both_the_start_and_the_reference(dpo_run):
    from peft import PeftModel

    from lorafit import adapters, models

    cfg, _, _, batch, acc = _pair_setup(f"lora.init_from={dpo_run}")
    model = adapters.attach_lora(models.build_model(cfg), cfg)
    trained = reply_logps(PeftModel.from_pretrained(_base_model(), str(dpo_run / "adapter")).eval(), batch)
    assert (trained - reply_logps(_base_model(), batch)).abs().max() > 0.5  # not the base: the test tells them apart
    model.train()  # the adapter has lora.dropout=0.1: the reference forward must run in eval mode all the same
    assert torch.allclose(objectives.reference_logps(model, batch, acc), trained, atol=1e-4, rtol=0)
    model.eval()
    assert torch.allclose(objectives.sequence_logps(model, batch)[0], trained, atol=1e-4, rtol=0)
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".default." in n}  # ref stays frozen after the reference forward


def test_init_from_trains_only_the_adapter_and_saves_it_alone(tmp_path, dpo_run, monkeypatch):
    from peft import PeftModel

    from lorafit import data, models
    from lorafit import train as train_module

    seen, build = {}, train_module.build_optimizer

    def spy(model, cfg):  # the model and the optimizer the loop trains with
        optimizer = build(model, cfg)
        params = dict(model.named_parameters())
        seen.update(optimizer=optimizer, params=params, start={n: p.detach().clone() for n, p in params.items()})
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    run_dir, summary = run_inprocess(tmp_path, *PREF, "train.max_steps=4", f"lora.init_from={dpo_run}",
                                     "lora.r=4")  # the adapter's own rank (8) is used
    params, start = seen["params"], seen["start"]
    ref = {n for n in params if ".ref." in n}
    assert len(ref) == 28  # A and B of 14 modules
    optimized = {id(p) for g in seen["optimizer"].param_groups for p in g["params"]}
    assert not optimized & {id(params[n]) for n in ref}
    assert all(torch.equal(params[n], start[n]) for n in ref)  # the reference never moved
    initial = load_file(dpo_run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(params[n], initial[n.replace(".ref.", ".")]) for n in ref)  # and it is the adapter loaded
    assert any(not torch.equal(params[n], start[n]) for n in params if ".default." in n)  # the policy trained
    # the saved adapter: the trained one alone, plain PEFT, at the starting adapter's rank
    out = run_dir / "adapter"
    assert not (out / "ref").exists() and not [p for p in out.iterdir() if p.is_dir()]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == initial.keys()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    # ... which, loaded with plain peft, gives the run's final evaluation (its reference: the starting adapter)
    cfg = compose(*PREF)
    tok = models.build_tokenizer(cfg.model)
    _, eval_ds = data.tokenize(data.load_splits(cfg), tok, cfg)
    batch = data.collate([eval_ds[i] for i in range(len(eval_ds))], tok.pad_token_id)
    pol = reply_logps(PeftModel.from_pretrained(_base_model(), str(out)).eval(), batch)
    ref_lp = reply_logps(PeftModel.from_pretrained(_base_model(), str(dpo_run / "adapter")).eval(), batch)
    b, ev = len(eval_ds), summary["eval"]
    margins = 0.1 * ((pol - ref_lp)[:b] - (pol - ref_lp)[b:])  # beta * (chosen log-ratio - rejected log-ratio)
    assert b == ev["n"] == 23
    assert abs(pol[:b].mean().item() - ev["chosen_logp"]) < 1e-4 and abs(pol[b:].mean().item() - ev["rejected_logp"]) < 1e-4
    assert abs(margins.mean().item() - ev["reward_margin"]) < 1e-5
    assert (margins > 0).double().mean().item() == ev["reward_accuracy"]


# ---- precomputed reference log-probabilities -------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_logps_give_the_live_reference_run(tmp_path, monkeypatch, objective):
    calls, live = {}, objectives.reference_logps

    def spy(model, batch, accelerator):  # which training batches carried their reference log-probabilities
        calls.setdefault(run, []).append("ref_logps" in batch)
        return live(model, batch, accelerator)

    monkeypatch.setattr(objectives, "reference_logps", spy)
    args = [*PREF, f"objective={objective}", "train.max_steps=3", "train.eval_every=3", "train.lr=3e-2", "hooks=[]"]
    runs = {}
    for run in ("live", "precomputed"):
        runs[run] = metrics_lines(run_inprocess(tmp_path / run, *args,
                                                f"objective.precompute_ref={run == 'precomputed'}")[0])
    assert calls == {"live": [False] * 3, "precomputed": [True] * 3}
    # Bitwise here: a row's log-probability does not depend on the rows padded beside it (the reference scored in
    # batches of train.eval_batch_size once, or of train.batch_size at each step). Losses, margins, grad norms, evals:
    assert runs["live"] == runs["precomputed"] and any("eval/kl" in l for l in runs["live"])


# ---- two processes ---------------------------------------------------------------------------------------------------

DIST = [*PREF, "train.max_steps=4", "train.lr=5e-3", "train.eval_batch_size=5", "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1 process, micro-batches of 2 pairs, 2 accumulated: the global batch of 2 processes x 2 pairs."""
    return cli_run_dir(tmp_path_factory, *DIST, "train.batch_size=2", "train.grad_accum=2")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_fsdp.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_two_processes_train_the_one_process_dpo_adapter(tmp_path, one_process, config):
    from test_distributed import adapters_of, launch_two

    two = launch_two(*DIST, "train.batch_size=2", f"hydra.run.dir={tmp_path}", config=config)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one_process, tmp_path))
    engine = "FSDP" if "fsdp" in config else "DEEPSPEED" if "zero" in config else "MULTI_CPU"
    assert s2["processes"] == 2 and s2["distributed"] == engine
    assert s1["eval"]["n"] == s2["eval"]["n"] == 23  # the pairs that pad the last batch are dropped
    for k in s1["eval"]:
        assert abs(s1["eval"][k] - s2["eval"][k]) <= 1e-5 * max(1, abs(s1["eval"][k])), (k, s1["eval"], s2["eval"])
    # every step's loss, reward margin and gradient norm (over the pairs of both processes)
    l1, l2 = ([l for l in metrics_lines(d) if "train/loss" in l] for d in (one_process, tmp_path))
    assert len(l1) == len(l2) == 4
    for x, y in zip(l1, l2):
        for k in ("train/loss", "train/reward_margin", "train/grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1, abs(x[k])), (k, x, y)
    a, b = adapters_of(one_process, tmp_path)
    assert a.keys() == b.keys()
    # Most weights agree to ~1e-7; Adam's m/sqrt(v) blows summation-order noise up on entries whose gradient is ~0
    # (lora_A's is 0 at step 1, B being 0), seen at 1e-5. A process's pairs weighted wrongly would be off by ~lr = 5e-3.
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-5, rtol=0), (k, (a[k] - b[k]).abs().max())


# ---- config errors: one line naming the key, no traceback ------------------------------------------------------------

def _write(tmp_path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


KTO_ROWS = [{"prompt": "Say hi.", "completion": "Hello!", "label": i % 2 == 0} for i in range(8)]
NO_REJECTED = [{"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."}] * 7 + [{"prompt": "Say hi.", "chosen": "Hi!"}]
BAD_PREFERENCE = {  # overrides on PREF (with the file a case writes), and what the one line must say
    "dpo_on_bbc_news": (lambda d: ["data=bbc_news"], "objective=dpo reads preference rows"),
    "dpo_on_a_classifier": (lambda d: ["model.task=seq_cls"], "model.task is seq_cls"),
    "packing": (lambda d: ["data.packing=true"], "data.packing=true packs SFT rows"),
    "beta_zero": (lambda d: ["objective.beta=0"], "objective.beta=0.0 must be > 0"),
    "label_smoothing_on_ipo": (lambda d: ["objective=ipo", "objective.label_smoothing=0.1"],
                               "objective.label_smoothing=0.1 applies to dpo and simpo, not ipo"),
    "sft_on_pairs": (lambda d: ["objective=sft"], "data=preference holds pairs for a preference objective"),
    "kto_rows_for_dpo": (lambda d: [f"data.train_file={_write(d, KTO_ROWS)}", f"data.eval_file={_write(d, KTO_ROWS)}"],
                         "holds KTO rows (prompt, completion, label): objective=dpo needs pairs"),
    "a_row_without_rejected": (lambda d: [f"data.train_file={_write(d, NO_REJECTED)}", f"data.eval_file={PAIRS_EVAL}"],
                               "a preference row's rejected has no assistant reply"),
    "no_rejected_column": (lambda d: [f"data.train_file={_write(d, [{'prompt': 'a', 'chosen': 'b'}] * 8)}"],
                           "data=preference needs columns chosen and rejected"),
    "init_from_an_empty_dir": (lambda d: [f"lora.init_from={d}"], "lora.init_from='/"),  # ... its path
}


@pytest.mark.parametrize("case", list(BAD_PREFERENCE))
def test_bad_preference_config_gets_one_clear_line(tmp_path, case):
    from test_reliability import _cli_inprocess

    make, needle = BAD_PREFERENCE[case]
    run_dir = tmp_path / "run"
    out = _cli_inprocess([*PREF, *make(tmp_path), f"hydra.run.dir={run_dir}"])
    assert out["code"] == 2, out
    assert needle in out["stderr"], out["stderr"]
    if case == "init_from_an_empty_dir":
        assert f"lora.init_from={str(tmp_path)!r}: no adapter_config.json there" in out["stderr"]
    assert "Traceback" not in out["stderr"] + out["stdout"]
    assert not any((run_dir / p).exists() for p in ("adapter", "checkpoints", "summary.json", "metrics.jsonl"))


def test_a_bad_preference_file_through_the_real_cli_is_one_line(tmp_path):
    out = run_cli(*PREF, f"data.train_file={_write(tmp_path, NO_REJECTED)}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("lorafit: error:")]
    assert "a preference row's rejected has no assistant reply" in line and '"chosen": "Hi!"' in line


@pytest.mark.slow
def test_kto_on_two_processes_is_one_process_with_their_rows_in_one_micro_batch(tmp_path):
    """KTO's reference point z is the mean log-ratio of the step's micro-batches over every process: 2 processes of 2
    rows equal 1 process of 4 (not 1 process of 2 rows accumulated twice, whose z is per micro-batch)."""
    from test_distributed import adapters_of, launch_two

    args = [*DIST, "objective=kto", "objective.beta=0.5"]
    one = run_cli(*args, "train.batch_size=4", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*args, "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = ([l for l in metrics_lines(tmp_path / d) if "train/loss" in l] for d in ("one", "two"))
    assert len(l1) == len(l2) == 4 and l1[0]["train/loss"] > 0
    for x, y in zip(l1, l2):
        for k in ("train/loss", "train/grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1, abs(x[k])), (k, x, y)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["eval"]["n"] == s2["eval"]["n"] == 46  # 23 pairs: a desirable and an undesirable row each
    # Adam's m/sqrt(v) turns summation-order noise on entries whose gradient is ~0 into steps of up to lr (seen: 3e-4
    # on one entry at lr 5e-3); each tensor as a whole agrees far closer than a wrongly weighted process would make it.
    a, b = adapters_of(tmp_path / "one", tmp_path / "two")
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-3 * a[k].norm(), (k, (a[k] - b[k]).norm() / a[k].norm())


def test_a_sweep_over_beta_is_reported_by_reward_accuracy(tmp_path):
    """A multirun of preference runs: sweep.json and the report read each run's primary metric, reward_accuracy."""
    out = run_cli("-m", *PREF, "train.max_steps=4", "lora.r=2,4", "hooks=[save_adapter,spectrum]",
                  "hooks.spectrum.plots=false", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["jobs"]) == 2 and all(j["status"] == "done" for j in sweep["jobs"])
    for job in sweep["jobs"]:
        summary = json.loads((Path(job["run_dir"]) / "summary.json").read_text())
        assert summary["primary_metric"] == "reward_accuracy" and job["metric"] == summary["eval"]["reward_accuracy"]
    assert "reward_accuracy" in (tmp_path / "report.md").read_text()


def test_eval_generate_scores_against_the_chosen_reply_and_a_dpo_adapter_shrinks(tmp_path, dpo_run):
    """eval.generate on pairs takes the chosen reply as the reference; lorafit.shrink reads a DPO run like any other."""
    import subprocess
    import sys

    run_dir, _ = run_inprocess(tmp_path, *PREF, "train.max_steps=2", "eval.generate=3", "eval.max_new_tokens=4")
    gens = [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()]
    eval_rows = [json.loads(l) for l in PAIRS_EVAL.read_text().splitlines()]
    assert [g["reference"] for g in gens] == [r["chosen"] for r in eval_rows[:3]]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "gen_rouge_l" in summary["eval"] and summary["primary_metric"] == "reward_accuracy"
    out = subprocess.run([sys.executable, "-m", "lorafit.shrink", str(dpo_run), "--rank", "2", "--out", str(tmp_path / "small")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 2
