"""Config composition, the CLI's resolved config, and validation that names every bad key."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, compose, run_cli

from lorafit.config import validate
from lorafit.errors import UserError

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_all_recipes_are_present():
    assert {"bbc_news", "sft_jsonl", "smollm2_bbc"} <= set(RECIPES)
    assert {f"glue_{t}" for t in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    cfg = compose(f"recipe={recipe}")
    assert cfg.lora.r > 0 and cfg.train.lr > 0
    if recipe.startswith("glue_"):
        assert cfg.data.source == "glue" and cfg.data.task == recipe.removeprefix("glue_")
        assert cfg.model.name == "FacebookAI/roberta-base" and cfg.lora.alpha == 8 and list(cfg.lora.target_modules) == ["query", "value"]


@pytest.mark.parametrize("recipe", ["bbc_news", "smollm2_bbc", "grpo_topic"])
def test_offline_recipes_validate(recipe):
    validate(compose(f"recipe={recipe}"))  # resolves the packaged model and checks target modules on it


def test_default_is_bbc_news_on_minilm():
    cfg = compose()
    assert (cfg.model.name, cfg.data.source, cfg.lora.r, cfg.lora.alpha, list(cfg.lora.target_modules)) == \
        ("minilm-l6", "bbc_news", 16, 32, ["query", "value"])  # bench/RESULTS.md: closing the LoRA-full gap
    assert (cfg.train.batch_size, cfg.data.max_length, cfg.train.max_steps) == (16, 128, 150)
    assert cfg.model.trust_remote_code is False


def test_cli_prints_resolved_config():
    out = run_cli("recipe=glue_mnli", "lora.r=16", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "\n  r: 16\n" in out.stdout and "task: mnli" in out.stdout and "roberta-base" in out.stdout


def test_hooks_select_as_a_list():
    cfg = compose("hooks=[save_adapter,spectrum,merge]")
    assert cfg.hooks.merge.dtype == "fp32" and cfg.hooks.save_adapter.dir == "adapter"
    assert compose().hooks.merge is None


BAD = [
    (["lora.r=0"], "lora.r=0"),
    (["lora.alpha=-1"], "lora.alpha=-1"),
    (["lora.dropout=1.0"], "lora.dropout=1.0"),
    (["lora.target_modules=[nope]"], "'nope' match no Linear module"),
    (["lora.target_modules='.*[.]nothing'"], "matches no Linear module"),
    (["model=tiny-bert", "lora.r=100"], "exceeds min(d, k)"),
    (["model.name=/no/such/dir"], "not a model dir"),
    (["data=files"], "data.source=files reads one of data.train_file, data.hf_dataset or data.mix: set one"),
    (["data=sft", "data.train_file=README.md", "data.hf_dataset=org/x"], "data.train_file and data.hf_dataset are all set"),
    (["data=sft", "data.mix=[{weight: 0}]"], "data.mix[0] needs one of train_file or hf_dataset"),
    (["data=sft", "data.mix=[{train_file: nope.jsonl, weight: 0}]"], "data.mix[0].weight=0.0 must be > 0"),
    (["data=sft", "data.mix=[{train_file: nope.jsonl}]"], "data.mix[0].train_file='nope.jsonl': file not found"),
    (["train.lr=0"], "train.lr=0"),
    (["quant=nf4", "lora.init=pissa"], "needs a float base"),
    (["train.early_stopping_patience=2", "train.eval_every=0"], "set train.eval_every=N"),
    (["data.eval_fraction=1.5"], "data.eval_fraction=1.5 must be in (0, 1)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o[0]) for o in BAD])
def test_validation_names_the_key(overrides, message):
    with pytest.raises(UserError) as e:
        validate(compose(*overrides))
    assert message in str(e.value)


@pytest.mark.parametrize("override,allowed", [("model.task=regress", "[seq_cls, causal_lm]"),
                                              ("quant.mode=fp3", "[none, int8, nf4]"),
                                              ("train.mixed_precision=fp8", "[auto, no, bf16, fp16]")])
def test_closed_choices_are_refused_at_compose_time_naming_key_and_values(override, allowed):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(override)
    message = str(e.value.__cause__)
    assert f"full_key: {override.split('=')[0]}" in message and f"expected one of {allowed}" in message


def test_unknown_target_lists_the_models_linear_names():
    with pytest.raises(UserError) as e:
        validate(compose("model=tiny-bert", "lora.target_modules=[qkv]"))
    for name in ("query", "key", "value", "dense"):
        assert name in str(e.value)


def test_validation_reports_every_problem_at_once():
    with pytest.raises(UserError) as e:
        validate(compose("lora.r=0", "lora.dropout=2", "train.batch_size=0", "lora.target_modules=[nope]"))
    for key in ("lora.r=0", "lora.dropout=2", "train.batch_size=0", "'nope'"):
        assert key in str(e.value)


def test_quantization_without_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="quant.mode=nf4 needs bitsandbytes"):
        validate(compose("model=tiny-llama", "lora.target_modules=[q_proj]", "quant=nf4"))


@pytest.mark.parametrize("args,needle", [
    (["lora.r=0"], "lora.r=0 must be a positive integer"),
    (["recipe=nope"], "bbc_news"),  # Hydra lists the recipes there are
    (["model=nope"], "minilm-l6"),  # ... and the model choices
    (["lora.r=abc"], "lora.r"),  # typed schema: the key is named
    (["lora.bogus=1"], "bogus"),  # unknown key
])
def test_cli_user_errors_have_no_traceback(args, needle):
    out = run_cli(*args, "hydra.run.dir=/tmp/lorafit-test-unused")
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_glue_offline_fails_with_one_actionable_line():
    out = run_cli("recipe=glue_mnli", "hydra.run.dir=/tmp/lorafit-test-unused")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "FacebookAI/roberta-base" in line and "model.name=/path/to/model_dir" in line


def test_glue_data_offline_points_at_local_files(tmp_path):
    out = run_cli("recipe=glue_mrpc", "model=tiny-bert", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "GLUE/mrpc could not be reached" in out.stderr and "data=files" in out.stderr
    assert not (tmp_path / "adapter").exists()
