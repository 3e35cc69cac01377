"""Saved adapters outside their run: whose config turns on remote code, which base and which tokenization they get
back, what generate and classify read from a row, and that every CLI's screen holds only lorafit's own lines."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import CLS_EVAL, REPO, TINY_CLS, TINY_LM, run_inprocess

# What libraries print on their own: load reports, kernel notices, DeepSpeed's accelerator line, deprecations,
# progress bars of loading, writing and dataset building, and any traceback.
NOISE = re.compile(r"LOAD REPORT|\| MISSING|kernels-community|Setting accelerator|Warning:|warnings\.warn|"
                   r"Loading weights|Writing model shards|Generating \w+ split|\bMap: |\bFilter: |Traceback")


def cli(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lorafit.MODULE ARGS` as a user types it (stdout and stderr in one stream, in order); whatever it
    says, none of it is a library's own noise."""
    out = subprocess.run([sys.executable, "-m", f"lorafit.{module}" if module else "lorafit", *map(str, args)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                         env={**os.environ, **(env or {})})
    assert not NOISE.search(out.stdout), out.stdout
    return out


def error_line(out: subprocess.CompletedProcess) -> str:
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("lorafit: error: "), out.stdout
    return lines[0]


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run_dir, summary = run_inprocess(tmp_path_factory.mktemp("cls"), *TINY_CLS, "train.max_steps=40", "hooks=[save_adapter]")
    assert summary["eval"]["accuracy"] > 0.9
    return run_dir


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run_dir, _ = run_inprocess(tmp_path_factory.mktemp("lm"), *TINY_LM, "train.max_steps=2", "hooks=[save_adapter]")
    return run_dir


def reference_probs(run_dir, rows: list[dict]) -> list[list[float]]:
    """The trained model's class probabilities of `rows` fed as its run's training data was: data.tokenize with
    the run's own config, one row at a time (no padding)."""
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf

    from lorafit import data
    from lorafit.generate import load

    cfg = OmegaConf.load(run_dir / "config.yaml")
    loaded = load(run_dir)
    ds = Dataset.from_list([{**r, "label": 0} for r in rows])
    enc, _ = data.tokenize(data.Splits(ds, ds, tuple(cfg.data.text_columns), loaded.labels), loaded.tokenizer, cfg)
    with torch.no_grad():
        return [loaded.model(**data.collate([r], loaded.tokenizer.pad_token_id)).logits.softmax(-1)[0].tolist()
                for r in enc.remove_columns("labels")]


# --- item 2: only the user's own flag runs a base's code -----------------------------------------------------------

def test_a_saved_trust_remote_code_does_not_run_the_bases_code(cls_run, tmp_path):
    """A downloaded adapter whose lorafit.json says trust_remote_code, on a base whose config.json names its own
    configuration_*.py: that code runs under generate, merge and shrink --intruders only with --trust-remote-code."""
    from lorafit.models import resolve

    base, adapter, marker = tmp_path / "base", tmp_path / "adapter", tmp_path / "MARKER"
    shutil.copytree(resolve("tiny-bert"), base)
    (base / "configuration_planted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig as _Bert\n\nclass BertConfig(_Bert):\n    pass\n")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_planted.BertConfig"}}))
    shutil.copytree(cls_run / "adapter", adapter)
    for name, edit in (("lorafit.json", lambda c: c["model"].update(name=str(base), trust_remote_code=True)),
                       ("adapter_config.json", lambda c: c.update(base_model_name_or_path=str(base)))):
        c = json.loads((adapter / name).read_text())
        edit(c)
        (adapter / name).write_text(json.dumps(c))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies remote code to import it

    for module, args in (("generate", (adapter, "--prompt", "match goal")), ("merge", (adapter, "--out", tmp_path / "m")),
                         ("shrink", (adapter, "--intruders", "0.5", "--out", tmp_path / "s"))):
        out = cli(module, *args, env=env)
        assert out.returncode == 0, out.stdout
        assert not marker.exists(), f"{module} ran the base's code unasked"
    assert "--trust-remote-code" in out.stdout  # the saved true is only a hint
    out = cli("generate", adapter, "--prompt", "match goal", "--trust-remote-code", env=env)
    assert out.returncode == 0 and marker.read_text() == "ran", out.stdout


# --- item 10: a classifier reads texts as its run did --------------------------------------------------------------

def test_classify_cuts_texts_at_the_runs_max_length(cls_run, tmp_path):
    """A text of over 512 tokens (tiny-bert's position limit) whose first 64 tokens are about sport and the rest
    about business: classified as the run's 64-token training data was, not at the tokenizer's limit (a crash)."""
    from lorafit.generate import load

    text = " ".join(["the striker scored a goal in the match"] * 8 + ["the bank shares rose on the market"] * 80)
    assert len(load(cls_run).tokenizer(text)["input_ids"]) > 512
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": text}) + "\n")
    out = cli("generate", cls_run, "--file", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl")
    assert out.returncode == 0 and "longer than 64 tokens" in out.stdout, out.stdout
    got = json.loads((tmp_path / "o.jsonl").read_text())
    labels = json.loads((cls_run / "adapter" / "lorafit.json").read_text())["labels"]
    want = reference_probs(cls_run, [{"text": text}])[0]
    assert got["probs"] == pytest.approx(dict(zip(labels, want)), abs=1e-3)


def test_a_sentence_pair_classifier_reads_its_text_columns(tmp_path):
    rows = list(csv.DictReader(open(CLS_EVAL)))
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "label"])
        for r in rows:
            words = r["text"].split()
            w.writerow([" ".join(words[:6]), " ".join(words[6:]), r["label"]])
    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, f"data.train_file={pairs}", f"data.eval_file={pairs}",
                               "data.text_columns=[premise,hypothesis]", "data.max_length=12", "train.max_steps=4",
                               "hooks=[save_adapter]")
    inputs = [{"premise": r[0], "hypothesis": r[1]} for r in list(csv.reader(open(pairs)))[1:5]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    out = cli("generate", run_dir, "--file", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl")
    assert out.returncode == 0, out.stdout
    got = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    labels = json.loads((run_dir / "adapter" / "lorafit.json").read_text())["labels"]
    assert [g["premise"] for g in got] == [r["premise"] for r in inputs]
    for g, want in zip(got, reference_probs(run_dir, inputs)):  # a pair, cut as data.tokenize cut it (longest first)
        assert g["probs"] == pytest.approx(dict(zip(labels, want)), abs=1e-3)
    assert "premise + hypothesis" in error_line(cli("generate", run_dir, "--prompt", "one text"))


# --- item 18: a messages row's reference reply is no part of the prompt ------------------------------------------

def test_generate_file_drops_a_messages_rows_reference_reply(lm_run, tmp_path, monkeypatch, capsys):
    from lorafit import generate as gen

    prompts = []
    monkeypatch.setattr(gen, "generate", lambda model, tok, batch, *a, **k: prompts.extend(batch) or ["x"] * len(batch))
    rows = [{"messages": [{"role": "user", "content": "Who scored?"}, {"role": "assistant", "content": "REFERENCE"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Who scored?"}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen.main([str(lm_run), "--file", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")])
    tok = gen.load(lm_run).tokenizer
    assert prompts == [gen.prompt_text(tok, rows[0]["messages"][:1]), gen.prompt_text(tok, rows[1]["messages"])]
    assert "REFERENCE" not in prompts[0]


# --- items 19, 20, 21: the base and the model dir --------------------------------------------------------------

def test_a_wrong_base_is_one_line(cls_run):
    assert "--base" in error_line(cli("generate", cls_run, "--base", "tiny-llama", "--prompt", "x"))


def test_a_run_dir_outlives_a_moved_cache(cls_run, tmp_path):
    """peft saved the base as an absolute path into LORAFIT_CACHE; the run's alias (lorafit.json) still finds it."""
    moved = tmp_path / "run"
    shutil.copytree(cls_run, moved)
    config = json.loads((moved / "adapter" / "adapter_config.json").read_text())
    gone = str(tmp_path / "old-cache" / "models" / "tiny-bert")
    (moved / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": gone}))
    here, there = cli("generate", cls_run, "--prompt", "match goal"), cli("generate", moved, "--prompt", "match goal")
    assert here.returncode == there.returncode == 0 and here.stdout == there.stdout, there.stdout
    info = json.loads((moved / "adapter" / "lorafit.json").read_text())
    info["model"]["name"] = gone  # a run trained on a local dir that has moved since: only --base helps
    (moved / "adapter" / "lorafit.json").write_text(json.dumps(info))
    for module, args in (("generate", ("--prompt", "x")), ("merge", ("--out", tmp_path / "m"))):
        assert "pass --base" in error_line(cli(module, moved, *args))
    assert not (tmp_path / "m").exists()


def test_generate_takes_a_full_fine_tuning_run_dir(tmp_path):
    run_dir, _ = run_inprocess(tmp_path, *TINY_CLS, "lora.method=full", "train.lr=1e-3", "train.max_steps=2",
                               "hooks=[save_adapter]")
    out = cli("generate", run_dir, "--prompt", "match goal striker")
    assert out.returncode == 0 and out.stdout.split("\t")[0] in ("business", "sport", "tech"), out.stdout
    assert "holds a full model" in error_line(cli("merge", run_dir, "--out", tmp_path / "m"))


# --- item 11: ROUGE-L beyond ASCII ------------------------------------------------------------------------------

def test_rouge_l_scores_chinese_and_russian_replies():
    from rouge_score import rouge_scorer

    from lorafit.metrics import generation

    same = ["今天天气很好", "Привет, как дела?"]
    assert generation(same, same)["rouge_l"] == 1.0
    assert 0 < generation(["今天天气很好"], ["今天天气不好"])["rouge_l"] < 1
    assert 0 < generation(["Привет, как дела?"], ["Привет, как жизнь?"])["rouge_l"] < 1
    ascii_pair = ("The cat_sat on the mat, 3 times!", "the cat sat on a mat 3x")  # as rouge-score scores ASCII
    default = rouge_scorer.RougeScorer(["rougeL"]).score(*ascii_pair)["rougeL"].fmeasure
    assert generation([ascii_pair[1]], [ascii_pair[0]])["rouge_l"] == pytest.approx(default)


# --- item 22: the first screen ------------------------------------------------------------------------------------

def test_every_cli_prints_only_lorafit_lines(cls_run, lm_run, tmp_path):
    """`cli` asserts no library noise in each; the other tests cover generate (both tasks), merge and shrink
    --intruders on the same runs."""
    assert cli("generate", lm_run, "--prompt", "hi", "--max-new-tokens", 4).returncode == 0
    assert cli("merge", cls_run, "--out", tmp_path / "merged").returncode == 0
    assert cli("shrink", cls_run, "--rank", 1, "--out", tmp_path / "shrunk").returncode == 0
    assert cli("compress", tmp_path / "merged", "--rank", 4, "--out", tmp_path / "c").returncode == 0
    assert cli("analyze", cls_run, "--no-plots", "--out", tmp_path / "a").returncode == 0
    assert "no job dirs" in error_line(cli("sweep_report", tmp_path / "a"))
    out = cli("", *TINY_CLS, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0 and "trainable params:" in out.stdout, out.stdout
    before = out.stdout[:out.stdout.index("trainable params:")].splitlines()
    assert all(re.match(r"\[[-\d :,]+\]\[lorafit(\.\w+)*\]\[(INFO|WARNING)\] - ", l) for l in before if l.strip()), before
