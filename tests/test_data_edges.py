"""Data edge cases: no eval row of a data.mix is trained on, long SFT rows keep their reply and dropped rows are
counted, float labels ask for a problem type, and class labels match as text across files."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import compose

from lorafit.data import load_splits, tokenize
from lorafit.errors import UserError
from lorafit.models import build_tokenizer


# ---- data.mix: each source holds out its own rows before mixing -------------------------------------------------

def _mix_sources(write_jsonl):
    alpaca = [{"instruction": f"a{i}", "output": f"A{i}"} for i in range(60)]
    sharegpt = [{"conversations": [{"from": "human", "value": f"s{i}"}, {"from": "gpt", "value": f"S{i}"}]}
                for i in range(10)]
    mix = (f"data.mix=[{{train_file: {write_jsonl('a.jsonl', alpaca)}, weight: 1}}, "
           f"{{train_file: {write_jsonl('s.jsonl', sharegpt)}, weight: 1}}]")
    source_rows = {f"a{i}" for i in range(60)} | {f"s{i}" for i in range(10)}
    return mix, source_rows


@pytest.mark.parametrize("strategy", ["over", "under"])
def test_mix_eval_rows_are_never_trained_on(write_jsonl, strategy, caplog):
    caplog.set_level(logging.INFO, logger="lorafit.data")
    mix, source_rows = _mix_sources(write_jsonl)
    args = ("model=tiny-llama", "data=sft", mix, f"data.mix_strategy={strategy}", "data.eval_fraction=0.1")
    splits = load_splits(compose(*args))
    first = lambda ds: [r["messages"][0]["content"] for r in ds]  # each source row's prompt is unique
    train, ev = first(splits.train), first(splits.eval)
    assert not set(ev) & set(train)  # over-sampling repeats training rows only
    assert len(ev) == len(set(ev)) == 6 + 1  # 10% of each source, each row once
    assert {p[0] for p in ev} == {"a", "s"}
    if strategy == "over":
        assert set(train) | set(ev) == source_rows  # nothing lost: every row is on one side
    assert "held out 6 of 60 rows of data.mix[0]" in caplog.text and "held out 1 of 10 rows of data.mix[1]" in caplog.text
    again = load_splits(compose(*args, "train.seed=7"))
    assert first(again.eval) == ev  # the same held-out rows whatever train.seed is


def test_files_mix_holds_out_stratified_per_source(tmp_path):
    from collections import Counter

    for name, n in (("x.csv", 40), ("y.csv", 20)):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{name} row {i},{'pos' if i % 2 else 'neg'}\n"
                                                             for i in range(n)))
    mix = f"data.mix=[{{train_file: {tmp_path / 'x.csv'}, weight: 1}}, {{train_file: {tmp_path / 'y.csv'}, weight: 3}}]"
    splits = load_splits(compose("model=tiny-bert", "data=files", mix, "data.eval_fraction=0.2"))
    assert not set(splits.eval["text"]) & set(splits.train["text"])
    assert Counter(t.split()[0] for t in splits.eval["text"]) == {"x.csv": 8, "y.csv": 4}
    assert Counter(splits.eval["label"]) == {0: 6, 1: 6}  # stratified within each source
    assert splits.labels == ["neg", "pos"]


# ---- SFT rows longer than data.max_length ------------------------------------------------------------------------

LONG = " ".join(["word"] * 60)


def _trained(row, tok) -> str:
    return tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != -100])


def _sft(write_jsonl, rows, *args, eval_rows=None):
    train = write_jsonl("t.jsonl", rows)
    ev = write_jsonl("e.jsonl", eval_rows) if eval_rows is not None else train
    cfg = compose("model=tiny-llama", "data=sft", f"data.train_file={train}", f"data.eval_file={ev}", *args)
    tok = build_tokenizer(cfg.model)
    return tokenize(load_splits(cfg), tok, cfg), tok


def test_a_long_prompt_is_cut_from_the_left_and_its_reply_trains(write_jsonl, caplog):
    rows = [{"prompt": LONG if i % 2 else f"q{i}", "response": f"answer {i}"} for i in range(20)]
    (train, ev), tok = _sft(write_jsonl, rows, "data.max_length=32")
    assert (len(train), len(ev)) == (20, 20)  # no row lost, in either split
    for i, row in enumerate(train):
        assert len(row["input_ids"]) <= 32
        assert _trained(row, tok) == f"answer {i}</s>\n"  # the whole reply, and its end of turn
    assert "10 of 20 train rows are longer than data.max_length=32 and were cut from the left" in caplog.text
    assert "10 of 20 eval rows are longer" in caplog.text
    assert "dropped" not in caplog.text


def test_a_reply_longer_than_max_length_keeps_its_start_after_its_prompt(write_jsonl, caplog):
    reply = " ".join(f"w{i}" for i in range(80))
    (train, _), tok = _sft(write_jsonl, [{"prompt": LONG, "response": reply}] * 4, "data.max_length=32")
    row = train[0]
    assert len(row["input_ids"]) == 32
    trained = _trained(row, tok)
    assert trained and reply.startswith(trained)  # the reply's start, cut from the right
    assert row["labels"][:16] == [-100] * 16 and row["labels"][16] != -100  # after the prompt's last 16 tokens
    assert "word" in tok.decode(row["input_ids"][:16])
    assert "in 4 the last reply alone is too long and keeps only its start" in caplog.text


def test_a_long_multi_turn_row_keeps_its_last_reply_and_counts_the_ones_lost(write_jsonl, caplog):
    turns = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "first reply"},
             {"role": "user", "content": LONG}, {"role": "assistant", "content": "last reply"}]
    (train, _), tok = _sft(write_jsonl, [{"messages": turns}] * 3, "data.max_length=48")
    assert len(train) == 3 and len(train[0]["input_ids"]) == 48
    assert _trained(train[0], tok) == "last reply</s>\n"  # the earlier reply fell out with the first turn
    assert "3 of 3 train rows are longer than data.max_length=48" in caplog.text
    assert "(3 earlier replies of multi-turn rows fell out)" in caplog.text
    (train, _), tok = _sft(write_jsonl, [{"messages": turns}], "data.max_length=512")
    assert _trained(train[0], tok) == "first reply</s>\nlast reply</s>\n"  # rows that fit keep every reply


def test_rows_without_a_reply_are_dropped_with_a_count_per_split(write_jsonl, caplog):
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    no_reply = [{"messages": [{"role": "user", "content": "hello"}]}] * 2
    (train, ev), _ = _sft(write_jsonl, good + no_reply, "data.max_length=64", eval_rows=good + no_reply * 2)
    assert (len(train), len(ev)) == (8, 8)
    assert ("2 of 10 train rows have no token to learn from (no assistant reply) and were dropped: "
            "the train split has 8 rows") in caplog.text
    assert "4 of 12 eval rows have no token to learn from" in caplog.text and "the eval split has 8 rows" in caplog.text


# ---- float labels: regression or classification, as the user says ------------------------------------------------

def _sts(tmp_path):
    """STS-B-like: sentence pairs scored 0..5 in steps of 0.5, a score the text decides (for the tiny run)."""
    path = tmp_path / "sts.csv"
    path.write_text("sentence1,sentence2,label\n" + "".join(f"pair {i} a,pair {i} b,{(i % 11) / 2:.1f}\n"
                                                            for i in range(40)))
    return ["model=tiny-bert", "data=files", f"data.train_file={path}", f"data.eval_file={path}",
            "data.text_columns=[sentence1,sentence2]"]


def test_float_labels_are_refused_until_a_problem_type_is_set(tmp_path):
    from lorafit import metrics

    with pytest.raises(UserError, match="column 'label' holds float labels .e.g. 0.0.: set data.problem_type=regression"):
        load_splits(compose(*_sts(tmp_path)))
    cfg = compose(*_sts(tmp_path), "data.problem_type=regression")
    splits = load_splits(cfg)
    assert metrics.problem_type(cfg) == "regression" and metrics.primary_metric(cfg) == "pearson"
    assert splits.labels == ["score"] and splits.train["label"][:4] == [0.0, 0.5, 1.0, 1.5]
    classes = load_splits(compose(*_sts(tmp_path), "data.problem_type=classification"))
    assert classes.labels == [f"{v / 2:.1f}" for v in range(11)]  # the user asked: each value is a class


def test_regression_on_float_labels_trains_a_one_output_head(tmp_path, caplog):
    from conftest import run_inprocess
    from safetensors.torch import load_file

    caplog.set_level(logging.INFO, logger="lorafit.data")
    run_dir, summary = run_inprocess(tmp_path, *_sts(tmp_path), "data.problem_type=regression", "train.mixed_precision=no",
                                     "train.max_steps=2", "train.batch_size=8", "hooks=[save_adapter]")
    assert summary["primary_metric"] == "pearson" and {"pearson", "spearman", "mse"} <= set(summary["eval"])
    assert "data.problem_type=regression: a one-output head fits column 'label'" in caplog.text
    assert json.loads((run_dir / "adapter" / "lorafit.json").read_text())["labels"] == ["score"]
    head = [w for k, w in load_file(run_dir / "adapter" / "adapter_model.safetensors").items() if "classifier.weight" in k]
    assert head and head[0].shape[0] == 1  # one output, not one per distinct score


def test_problem_type_is_checked(tmp_path, write_jsonl):
    from lorafit.config import validate

    with pytest.raises(UserError, match="data.problem_type=regression is for data=files with model.task=seq_cls"):
        validate(compose("model=tiny-llama", "data=sft", "data.problem_type=regression",
                         f"data.train_file={write_jsonl('t.jsonl', [{'prompt': 'q', 'response': 'a'}])}"))
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 1.5}\n" for i in range(8)))
    with pytest.raises(UserError, match="data.problem_type=regression needs numbers in column 'label', not 'pos'"):
        load_splits(compose("model=tiny-bert", "data=files", f"data.train_file={tmp_path / 't.csv'}",
                            "data.problem_type=regression"))


# ---- class labels: 1 and "1" are one class, whichever file holds which -------------------------------------------

@pytest.mark.parametrize("train_ext,eval_ext", [("csv", "jsonl"), ("jsonl", "csv"), ("jsonl", "jsonl")])
def test_int_and_string_labels_match_as_text_across_files(tmp_path, train_ext, eval_ext):
    def write(name, ext, n):
        labels = [(2, 10)[i % 2] for i in range(n)]
        path = tmp_path / f"{name}.{ext}"
        if ext == "csv":  # the csv reader makes the column ints
            path.write_text("text,label\n" + "".join(f"row {i},{l}\n" for i, l in enumerate(labels)))
        else:  # labels as strings
            path.write_text("".join(json.dumps({"text": f"row {i}", "label": str(l)}) + "\n" for i, l in enumerate(labels)))
        return path

    cfg = compose("model=tiny-bert", "data=files", f"data.train_file={write('t', train_ext, 12)}",
                  f"data.eval_file={write('e', eval_ext, 6)}")
    splits = load_splits(cfg)
    assert splits.labels == ["2", "10"]  # numbers in numeric order, as text or not
    assert splits.eval["label"] == [0, 1] * 3 and splits.train["label"][:2] == [0, 1]


def test_an_eval_label_unseen_in_train_is_one_line(tmp_path, write_jsonl):
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(8)))
    ev = write_jsonl("e.jsonl", [{"text": "x", "label": "1"}, {"text": "y", "label": "yes"}])
    with pytest.raises(UserError, match=r"labels \['yes'\] are not in the training label set \['0', '1'\]"):
        load_splits(compose("model=tiny-bert", "data=files", f"data.train_file={tmp_path / 't.csv'}", f"data.eval_file={ev}"))
