"""objective=grpo: each loss type and the advantages against a hand computation, the reward functions' arguments
and errors, per-row sampling, no reference forward at beta=0, the direction of an update, 2 processes equal to 1,
bitwise resume with sampling (inside a rollout's updates too), QLoRA with the hooks, and one-line config errors."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli_run_dir, compose, metrics_lines, run_cli, run_inprocess
from safetensors.torch import load_file

from lorafit import grpo, rewards
from lorafit.errors import UserError

DATA = Path(__file__).resolve().parent / ".data"


def write_sums(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"What is {a}+{b}?", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SUMS_TRAIN = write_sums(DATA / "sums_train.jsonl", 32, 0)
SUMS_EVAL = write_sums(DATA / "sums_eval.jsonl", 7, 1)  # 7 prompts: over 2 processes, the last batch is padded
GRPO = ["model=tiny-llama", "data=prompts", "objective=grpo", f"data.train_file={SUMS_TRAIN}", f"data.eval_file={SUMS_EVAL}",
        "objective.rewards=[{_target_: lorafit.rewards.number_match, column: answer, weight: 1.0}, "
        "{_target_: lorafit.rewards.regex_format, pattern: e, full: false, weight: 0.5}]",  # about half the tiny model's replies
        "objective.num_generations=4", "objective.max_new_tokens=6", "train.mixed_precision=no", "lora.r=4",
        "lora.alpha=8", "lora.target_modules=all-linear", "data.max_length=32", "train.batch_size=2",
        "train.eval_batch_size=4", "train.log_every=1", "train.eval_every=2", "train.lr=1e-2", "hooks=[save_adapter]",
        "train.max_steps=4"]


# ---- the math, by hand -----------------------------------------------------------------------------------------------

def _o(**keys):
    return SimpleNamespace(**{"epsilon": 0.2, "epsilon_high": None, "beta": 0.0, "loss_type": "dapo", "max_new_tokens": 4,
                              "kl_correction": False, **keys})


def test_advantages_are_normalized_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    adv, std = grpo.advantages(r, 4, "group")
    s = (0.75 / 3) ** 0.5  # unbiased std of [1, 0, 0, 0]: sqrt(sum((x - 0.25)^2) / 3)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s + 1e-4)
    assert torch.allclose(adv[:4], expected, atol=1e-6) and torch.equal(adv[4:], torch.zeros(4))  # equal rewards: 0
    assert torch.allclose(std, torch.tensor([s, 0.0]), atol=1e-7)
    unscaled, _ = grpo.advantages(r, 4, "none")  # Dr. GRPO: the mean is taken out, nothing divided
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


# Two completions of 3 and 2 tokens (the second's third position is padding). Ratios exp(logp - old):
# row 0: 1.5, 1.0, 0.5; row 1: 1.1, 0.7. Advantages +1 and -1.
LOGP = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.7, 1.0]]))
OLD = torch.zeros(2, 3)
REF = torch.log(torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]]))
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_the_clipped_surrogate_and_kl_per_token_are_the_hand_computed_ones():
    loss, flags = grpo.token_losses(LOGP, OLD, REF, ADV, MASK, _o(epsilon=0.2, epsilon_high=0.3))
    # A = +1: -min(ρ, clip(ρ, 0.8, 1.3)) = -1.3 (ρ 1.5 clipped above), -1.0, -0.5 (below: min keeps ρ)
    # A = -1: -min(-ρ, -clip(ρ)) = max(ρ, clip(ρ)) = 1.1, 0.8 (ρ 0.7 clipped up to 0.8)
    assert torch.allclose(loss[0], torch.tensor([-1.3, -1.0, -0.5])) and torch.allclose(loss[1, :2], torch.tensor([1.1, 0.8]))
    assert flags["clipped"].tolist() == [[True, False, False], [False, True, False]] and flags["kl"] is None
    with_kl, flags = grpo.token_losses(LOGP, OLD, REF, ADV, MASK, _o(beta=0.5))
    d = REF - LOGP
    k3 = torch.exp(d) - d - 1  # e.g. row 0 token 1: exp(log 2) - log 2 - 1 = 0.3069
    assert torch.allclose(flags["kl"], k3) and abs(float(k3[0, 1]) - (2 - 0.693147 - 1)) < 1e-5
    assert torch.allclose(with_kl - grpo.token_losses(LOGP, OLD, REF, ADV, MASK, _o())[0], 0.5 * k3, atol=1e-6)
    # kl_correction (TRL's default): the k3 term times the ratio, whose gradient is the unbiased reverse-KL one
    corrected, flags = grpo.token_losses(LOGP, OLD, REF, ADV, MASK, _o(beta=0.5, kl_correction=True))
    ratio = torch.exp(LOGP - OLD)
    assert torch.allclose(flags["kl"], k3 * ratio) and torch.allclose(corrected - with_kl, 0.5 * k3 * (ratio - 1), atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_each_loss_type_normalizes_as_its_paper_does(loss_type):
    o = _o(loss_type=loss_type, epsilon=0.2, epsilon_high=0.3, max_new_tokens=4)
    tokens, _ = grpo.token_losses(LOGP, OLD, REF, ADV, MASK, o)
    sums = grpo.LOSS_TYPES[loss_type](tokens, MASK, o)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 1, 2, -100]])  # the batch whose targets MASK marks
    loss = float(sums.sum() / grpo.units({"labels": labels}, o))
    row0, row1 = -1.3 - 1.0 - 0.5, 1.1 + 0.8
    expected = {"grpo": (row0 / 3 + row1 / 2) / 2,  # each completion's token mean, then the mean over completions
                "dapo": (row0 + row1) / 5,  # every token counts once: 5 completion tokens
                "dr_grpo": (row0 + row1) / (2 * 4)}[loss_type]  # over completions x max_new_tokens
    assert abs(loss - expected) < 1e-6, (loss, expected)


# ---- rewards ---------------------------------------------------------------------------------------------------------

def test_the_shipped_rewards():
    assert rewards.exact_match(None, ["Sport.", "tech stuff"], answer=["sport", "tech"]) == [1.0, 0.0]
    assert rewards.exact_match(None, ["Sport.", "tech stuff"], match="first_word", answer=["sport", "tech"]) == [1.0, 1.0]
    assert rewards.exact_match(None, ["It is sport", "sports"], match="contains", answer=["sport", "sport"]) == [1.0, 0.0]
    assert rewards.exact_match(None, [" Sport "], normalize="strip", answer=["Sport"]) == [1.0]
    assert rewards.number_match(None, ["so 1,234 it is", "\\boxed{7}, not 9", "none", "3.50"],
                                answer=[1234, "... #### 7", 3, "3.5"]) == [1.0, 1.0, 0.0, 1.0]
    assert rewards.number_match(None, ["7 then \\boxed{8}", "just 7"], where="boxed", answer=[8, 7]) == [1.0, 0.0]
    assert rewards.regex_format(None, ["sport", "two words"]) == [1.0, 0.0]
    assert rewards.length_penalty(None, ["x"], completion_ids=[[1] * 10], target=2, per_token=4) == [-2.0]
    choices = ["business", "sport", "tech"]
    assert rewards.choice_match(None, ["Sport!", "business or sport", "I think tech."], choices=choices,
                                answer=["sport", "sport", "sport"]) == [1.0, 0.0, 0.0]  # hedging gets nothing


def test_a_reward_gets_the_prompts_completions_ids_and_columns_for_each_completion(tmp_path, monkeypatch):
    seen = []

    def spy(prompts, completions, completion_ids, **columns):
        seen.append({"prompts": prompts, "completions": completions, "ids": completion_ids, "columns": columns})
        return [0.0] * len(completions)

    import test_grpo

    monkeypatch.setattr(test_grpo, "spy", spy, raising=False)
    run_inprocess(tmp_path, *GRPO, "objective.rewards=[{_target_: test_grpo.spy}]", "train.max_steps=1",
                  "train.eval_every=0")
    train = seen[0]  # the first rollout: 2 prompts x 4 completions
    rows = [json.loads(l) for l in SUMS_TRAIN.read_text().splitlines()]
    assert len(train["completions"]) == len(train["ids"]) == 8
    assert set(train["columns"]) == {"answer"}  # every column but the prompt and lorafit's own
    assert train["prompts"][:4] == [train["prompts"][0]] * 4 and train["prompts"][0] in [r["prompt"] for r in rows]
    by_prompt = {r["prompt"]: r["answer"] for r in rows}
    assert train["columns"]["answer"] == [by_prompt[p] for p in train["prompts"]]  # each completion its own row's
    assert all(isinstance(c, str) for c in train["completions"]) and all(isinstance(i, list) for i in train["ids"])


@pytest.mark.parametrize("returns, needle", [
    (lambda n: [1.0] * (n - 1), "returned 7 values for 8 completions"),
    (lambda n: [float("nan")] * n, "returned nan for completion 0"),
    (lambda n: [None] * n, "returned None for completion 0"),
    (lambda n: 1 / 0, "reward bad raised ZeroDivisionError"),
])
def test_a_bad_reward_is_named_in_one_line(returns, needle):
    bad = rewards.Reward("bad", lambda prompts, completions, completion_ids, **c: returns(len(completions)), 1.0)
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        rewards.score([bad], ["p"] * 8, ["c"] * 8, [[1]] * 8, {})


# ---- sampling and the update -----------------------------------------------------------------------------------------

def _tiny(*overrides):
    from lorafit import adapters, models

    cfg = compose(*GRPO, *overrides)
    torch.manual_seed(0)
    model = adapters.attach_lora(models.build_model(cfg), cfg)
    return cfg, model, models.build_tokenizer(cfg.model)


class _OneProcess:
    device = torch.device("cpu")
    num_processes, distributed_type = 1, "NO"

    def unwrap_model(self, m):
        return m

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_a_row_samples_the_same_tokens_whatever_else_is_in_its_batch():
    _, model, tok = _tiny()
    prompts = [tok("What is 1+2?", add_special_tokens=False)["input_ids"], tok("Hi", add_special_tokens=False)["input_ids"]]
    both, _ = grpo.complete(model, prompts, tok, 8, _OneProcess(), grpo.RowSampler([11, 22], 1.0, 0.9))
    alone, _ = grpo.complete(model, prompts[1:], tok, 8, _OneProcess(), grpo.RowSampler([22], 1.0, 0.9))
    other, _ = grpo.complete(model, prompts[1:], tok, 8, _OneProcess(), grpo.RowSampler([23], 1.0, 0.9))
    assert both[1] == alone[0] != other[0]  # its own seed decides, padding and neighbours do not


def test_a_group_reads_its_prompt_once_and_samples_what_g_separate_prompts_would():
    _, model, tok = _tiny()
    prompts = [tok("What is 1+2?", add_special_tokens=False)["input_ids"], tok("Hi", add_special_tokens=False)["input_ids"]]
    seeds, g = [11, 12, 13, 21, 22, 23], 3
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        shared, cut = grpo.complete(model, prompts, tok, 8, _OneProcess(), grpo.RowSampler(seeds, 1.0, 0.9), copies=g)
    finally:
        hook.remove()
    repeated, cut_r = grpo.complete(model, [p for p in prompts for _ in range(g)], tok, 8, _OneProcess(),
                                    grpo.RowSampler(seeds, 1.0, 0.9))
    assert shared == repeated and cut == cut_r and len(set(map(tuple, shared))) > 1  # the same samples, not all alike
    width = max(map(len, prompts))
    assert shapes[0] == (2, width - 1)  # the prompts, once each, before the cache is repeated
    assert all(s[0] == 2 * g and s[1] == 1 for s in shapes[1:])  # then one new token per copy and step


def test_an_update_raises_the_likelihood_of_completions_with_positive_advantage():
    cfg, model, tok = _tiny()
    o = cfg.objective
    prompts = [tok("What is 1+2?", add_special_tokens=False)["input_ids"]] * 8
    completions, _ = grpo.complete(model, prompts, tok, 6, _OneProcess(), grpo.RowSampler(list(range(8)), 1.0, 1.0))
    batch = grpo._training_batch(prompts, completions, None, tok.pad_token_id)
    batch["advantages"] = torch.tensor([1.0, -1.0] * 4)
    logp = lambda: (grpo.token_logps(model, batch, o.temperature) * (batch["labels"][:, 1:] != -100)).sum(1)
    before = logp().detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    objective = grpo.build(cfg, _OneProcess(), tok, Path("."))
    losses, _ = objective.loss(model, batch)
    (losses.sum() / objective.units(batch)).backward()
    opt.step()
    change = logp().detach() - before
    # to first order the step moves sum_i A_i logp_i up by lr |grad|^2; a sign error would move it down
    assert float((batch["advantages"] * change).sum()) > 0 and change[0::2].mean() > change[1::2].mean(), change


def test_beta_zero_runs_no_reference_forward_and_beta_above_zero_does(tmp_path, monkeypatch):
    from lorafit import objectives

    calls = []
    real = objectives.as_reference

    def counting(model, accelerator):
        calls.append(1)
        return real(model, accelerator)

    monkeypatch.setattr(grpo, "as_reference", counting)
    _, s0 = run_inprocess(tmp_path / "b0", *GRPO, "train.max_steps=2", "train.eval_every=0")
    assert calls == [] and "train/kl" not in json.dumps(metrics_lines(tmp_path / "b0" / "run"))
    _, s1 = run_inprocess(tmp_path / "b1", *GRPO, "train.max_steps=2", "train.eval_every=0", "objective.beta=0.04")
    assert len(calls) == 2  # one reference forward per rollout
    kl = [l["train/kl"] for l in metrics_lines(tmp_path / "b1" / "run") if "train/kl" in l]
    assert len(kl) == 2 and kl[0] == 0.0 and kl[1] > 0  # the policy starts at the reference, then moves


# ---- runs through the CLI --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    return cli_run_dir(tmp_path_factory, *GRPO, "train.save_every=1")


def test_a_grpo_run_logs_its_rewards_and_is_judged_by_eval_reward(grpo_run):
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["primary_metric"] == "reward" and summary["objective"] == "grpo"
    assert 0 < summary["rollout_share"] < 1
    lines = metrics_lines(grpo_run)
    train = [l for l in lines if "train/loss" in l]
    assert [l["step"] for l in train] == [1, 2, 3, 4]
    for key in ("reward", "reward/number_match", "reward/regex_format", "reward_std", "clip_ratio", "completion_length",
                "truncated_fraction", "generate_s", "step_s"):
        assert all(f"train/{key}" in l for l in train), key
    assert all(l["train/reward"] == pytest.approx(l["train/reward/number_match"] + 0.5 * l["train/reward/regex_format"],
                                                  abs=1e-5) for l in train)
    evals = [l for l in lines if "eval/reward" in l]
    assert [l["step"] for l in evals] == [2, 4] and all(l["eval/n"] == 7 for l in evals)
    samples = [json.loads(l) for l in (grpo_run / "generations.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 7 + [4] * 7 and {"prompt", "output", "reward", "answer"} <= set(samples[0])
    assert summary["eval"]["reward"] == pytest.approx(sum(s["reward"] for s in samples[7:]) / 7, abs=1e-6)


@pytest.mark.slow
def test_a_killed_grpo_run_resumes_bitwise_sampling_included(tmp_path, grpo_run):
    crashed = run_cli(*GRPO, "train.save_every=1", f"hydra.run.dir={tmp_path}", env={"LORAFIT_FAULT": "step:3"})
    assert crashed.returncode == -signal.SIGKILL
    resumed = run_cli(*GRPO, "train.save_every=1", "train.resume=auto", f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3/4" in resumed.stdout  # the kill came after step 3 was saved
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (grpo_run, tmp_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _same_but_times(tmp_path, grpo_run)  # every reward, clip ratio and eval, bitwise
    gen = lambda d: [(s["step"], s["output"]) for s in map(json.loads, (d / "generations.jsonl").read_text().splitlines())]
    assert gen(tmp_path) == gen(grpo_run)


def _same_but_times(a: Path, b: Path) -> bool:
    """metrics.jsonl equal but for the wall-clock figures (train/generate_s, train/step_s)."""
    strip = lambda d: [{k: v for k, v in l.items() if not k.endswith("_s")} for l in metrics_lines(d)]
    return strip(a) == strip(b)


@pytest.mark.slow
def test_a_run_killed_inside_a_rollouts_updates_resumes_bitwise(tmp_path):
    """objective.iterations=2: steps 1-2 train on one rollout, 3-4 on the next. Killed after step 3's checkpoint, the
    run resumes there and trains step 4 on the saved rollout, with its off-policy ratio."""
    args = [*GRPO, "objective.iterations=2", "train.save_every=1", "train.eval_every=0"]
    whole = run_cli(*args, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    crashed = run_cli(*args, f"hydra.run.dir={tmp_path / 'cut'}", env={"LORAFIT_FAULT": "step:3"})
    assert crashed.returncode == -signal.SIGKILL and (tmp_path / "cut/checkpoints/step_3/rollout_0.safetensors").is_file()
    resumed = run_cli(*args, "train.resume=auto", f"hydra.run.dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0 and "at step 3/4" in resumed.stdout, resumed.stderr[-2000:]
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _same_but_times(tmp_path / "whole", tmp_path / "cut")
    clip = [l["train/clip_ratio"] for l in metrics_lines(tmp_path / "whole") if "train/loss" in l]
    assert clip[0] == clip[2] == 0.0 and clip[1] + clip[3] > 0  # the second update of a rollout is off-policy


@pytest.mark.slow
def test_two_processes_sample_and_train_what_one_does(tmp_path):
    from test_distributed import adapters_of, launch_two

    args = [*GRPO, "train.eval_every=4"]
    one = run_cli(*args, "train.batch_size=1", "train.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch_two(*args, "train.batch_size=1", f"hydra.run.dir={tmp_path / 'two'}", config="cpu_ddp.yaml")
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = ([l for l in metrics_lines(tmp_path / d) if "train/loss" in l] for d in ("one", "two"))
    for x, y in zip(l1, l2, strict=True):
        for k in x:
            if not k.endswith("_s"):
                assert abs(x[k] - y[k]) <= 1e-5 * max(1, abs(x[k])), (k, x, y)
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["processes"] == 2 and s1["eval"]["n"] == s2["eval"]["n"] == 7
    assert s1["eval"] == pytest.approx(s2["eval"], abs=1e-6)
    a, b = adapters_of(tmp_path / "one", tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-5, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_qlora_grpo_trains_and_the_spectrum_and_merge_hooks_run(tmp_path):
    pytest.importorskip("bitsandbytes")
    run_dir, summary = run_inprocess(tmp_path, *GRPO, "quant=nf4", "train.max_steps=2", "train.eval_every=0",
                                     "hooks=[save_adapter,spectrum,merge]")
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["max_abs_diff_merged_vs_unmerged"] <= report["tolerance"], report  # the merge refuses otherwise
    assert summary["spectrum"]["modules"] > 0 and (run_dir / "analysis" / "spectrum.json").is_file()


# ---- config errors ---------------------------------------------------------------------------------------------------

BAD_GRPO = {
    "no_rewards": (["objective.rewards=[]"], "objective=grpo needs objective.rewards"),
    "reward_not_importable": (["objective.rewards=[{_target_: nowhere.reward}]"], "objective.rewards[0]: _target_='nowhere.reward' can't be imported"),
    "one_generation": (["objective.num_generations=1"], "objective.num_generations=1 must be >= 2"),
    "on_pairs": (["data=preference"], "objective=grpo reads prompt rows"),
    "temperature_zero": (["objective.temperature=0"], "objective.temperature=0.0 must be > 0"),
    "sft_on_prompts": (["objective=sft"], "data=prompts holds prompts without replies"),
    "plain_text_sft": (["objective=sft", "data=sft", "data.chat_template=false"], "data.chat_template=false applies to prompt rows"),
    "bbc_without_template": (["data=bbc_news", "data.train_file=null", "data.eval_file=null"],
                             "objective=grpo on data=bbc_news makes each article's prompt from data.prompt_template"),
}


@pytest.mark.parametrize("case", list(BAD_GRPO))
def test_bad_grpo_config_gets_one_clear_line(tmp_path, case):
    from test_reliability import _cli_inprocess

    overrides, needle = BAD_GRPO[case]
    out = _cli_inprocess([*GRPO, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert out["code"] == 2 and needle in out["stderr"], out
    assert "Traceback" not in out["stderr"] + out["stdout"]


def test_a_reward_that_fails_mid_run_is_one_line_through_the_real_cli(tmp_path):
    out = run_cli(*GRPO, "objective.rewards=[{_target_: lorafit.rewards.exact_match, column: nope}]",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.startswith("lorafit: error:")]
    assert "the data has no column 'nope'" in line and "answer" in line


def test_a_template_names_the_missing_column(tmp_path):
    from test_reliability import _cli_inprocess

    out = _cli_inprocess([*GRPO, "data.prompt_template='Q: {question}'", f"hydra.run.dir={tmp_path / 'run'}"])
    assert out["code"] == 2 and "can't be filled from a row with columns prompt, answer" in out["stderr"], out


def test_chat_template_false_gives_the_model_the_prompt_as_plain_text():
    from lorafit import data, models

    cfg = compose(*GRPO, "data.prompt_template='Q: {prompt} A:'", "data.chat_template=false")
    tok = models.build_tokenizer(cfg.model)
    train, _ = data.tokenize(data.load_splits(cfg), tok, cfg)
    assert tok.decode(train[0]["input_ids"]) == (tok.bos_token or "") + "Q: What is 7+7? A:"
    templated, _ = data.tokenize(data.load_splits(compose(*GRPO)), tok, compose(*GRPO))
    assert "user" in tok.decode(templated[0]["input_ids"])  # the default: the chat template's turns


@pytest.mark.slow
def test_the_grpo_topic_recipe_runs_on_the_packaged_model_and_scores_its_prompts(tmp_path):
    """The shipped recipe end to end, briefly (its 40-step result is in docs/grpo.md): the few-shot prompt as plain
    text, and the base's greedy replies scored against the real topics."""
    run_dir, summary = run_inprocess(tmp_path, "recipe=grpo_topic", "train.max_steps=2", "train.eval_every=0",
                                     "data.eval_size=16", "hooks=[save_adapter]")
    first = json.loads((run_dir / "generations.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["prompt"].rstrip().endswith("Topic:") and "<|im_start|>user" not in first["prompt"]
    base = [m for m in metrics_lines(run_dir) if "eval/reward/exact_match" in m][0]
    assert base["step"] == 0 and 0.2 < base["eval/reward/exact_match"] <= 1  # the few-shot base beats 1 in 5
    assert summary["eval"]["n"] == 16 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
