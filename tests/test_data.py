"""Data: SFT loss masking, truncation counting, dynamic padding."""

from __future__ import annotations

from conftest import compose

import json

import pytest

from lorafit.data import _encode_sft, collate, load_splits, sft_format, tokenize
from lorafit.errors import UserError
from lorafit.models import build_tokenizer


def _sft_tokens(rows, tok):
    batch = {k: [r.get(k) for r in rows] for k in rows[0]}
    return _encode_sft(batch, tok, max_len=256, formats=sft_format(list(rows[0]), "auto", "rows"))


def test_sft_loss_falls_on_response_tokens_only():
    tok = build_tokenizer(compose("model=tiny-llama").model)
    assert tok.chat_template  # the tiny Llama has one, like SmolLM2
    out = _sft_tokens([{"prompt": "What is two plus two?", "response": "Four."}], tok)
    ids, labels = out["input_ids"][0], out["labels"][0]
    trained = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert trained == "Four.</s>\n"  # the reply and its end-of-turn, not the prompt or the assistant header
    assert "What is two plus two?" in tok.decode(ids)


def test_sft_multi_turn_trains_every_assistant_turn():
    tok = build_tokenizer(compose("model=tiny-llama").model)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    out = _sft_tokens([{"messages": msgs}], tok)
    ids, labels = out["input_ids"][0], out["labels"][0]
    trained = tok.decode([i for i, l in zip(ids, labels) if l != -100])
    assert "Hello" in trained and "Goodbye" in trained and "Bye</s>" not in trained.replace("Goodbye", "")
    assert "Be brief" not in trained and "Hi" not in trained


SAME_CHAT = {  # one conversation in each SFT format: all must give the tokens and loss mask of `messages`
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add.\n\n2+2"},
                              {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Add.\n\n2+2"},
                                   {"from": "gpt", "value": "4"}]},
    "alpaca": {"system": "Be brief.", "instruction": "Add.", "input": "2+2", "output": "4"},
}


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_sft_formats_give_the_same_tokens_as_messages(fmt):
    tok = build_tokenizer(compose("model=tiny-llama").model)
    assert sft_format(list(SAME_CHAT[fmt]), "auto", "rows") == (fmt,)  # detected from the columns
    assert _sft_tokens([SAME_CHAT[fmt]], tok) == _sft_tokens([SAME_CHAT["messages"]], tok)
    plain = {"prompt": "Add.\n\n2+2", "response": "4"}  # alpaca without system/input is prompt/response
    alpaca = {"instruction": "Add.\n\n2+2", "input": "", "output": "4"}
    assert _sft_tokens([alpaca], tok) == _sft_tokens([plain], tok)


def test_sft_format_errors_name_the_columns(write_jsonl):
    with pytest.raises(UserError, match="data.format=alpaca needs the column.*'instruction'.*its columns are: text"):
        sft_format(["text"], "alpaca", "data.train_file='x.jsonl'")
    with pytest.raises(UserError, match="no SFT format fits its columns \\(text\\).*sharegpt \\(conversations\\)"):
        sft_format(["text"], "auto", "data.train_file='x.jsonl'")
    tok = build_tokenizer(compose("model=tiny-llama").model)
    with pytest.raises(UserError, match="sharegpt turn with 'from'='bot'"):
        _sft_tokens([{"conversations": [{"from": "bot", "value": "x"}]}], tok)
    cfg = compose("model=tiny-llama", "data=sft", "data.eval_fraction=0.5",
                  f"data.train_file={write_jsonl('t.jsonl', [{'prompt': 'q', 'response': 'a'}, {'messages': None}] * 4)}")
    with pytest.raises(UserError, match="an SFT row has no messages or prompt/response .data.format=messages.prompt_response."):
        tokenize(load_splits(cfg), tok, cfg)


def test_truncation_is_counted_and_applied(caplog):
    cfg = compose("model=tiny-bert", "data.max_length=32", "data.eval_size=20", "data.max_train_samples=50")
    tok = build_tokenizer(cfg.model)
    train, ev = tokenize(load_splits(cfg), tok, cfg)
    assert max(len(r) for r in train["input_ids"]) == 32 and len(train) == 50
    assert "50 of 50 train rows are longer than data.max_length=32" in caplog.text
    assert train[0]["input_ids"][-1] == tok.sep_token_id  # truncation keeps the closing special token


def test_bbc_split_is_fixed_and_disjoint():
    a, b = load_splits(compose()), load_splits(compose("train.seed=7"))
    assert a.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(a.eval) == 500 and 2000 < len(a.train) + 500 <= 2225
    assert a.eval["text"] == b.eval["text"]  # independent of train.seed
    assert not set(a.eval["text"]) & set(a.train["text"])  # the corpus's verbatim repeats don't leak


def test_collate_pads_to_the_longest_row_only():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [-100]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


def test_chat_template_that_is_not_prefix_stable_is_refused():
    import pytest

    from lorafit.errors import UserError

    tok = build_tokenizer(compose("model=tiny-llama").model)
    # A template that numbers turns from the end rewrites every earlier turn once another is added.
    tok.chat_template = "{% for m in messages %}[{{ messages|length - loop.index }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="chat template"):
        _sft_tokens([{"prompt": "What is two plus two?", "response": "Four."}], tok)


def test_a_files_dataset_with_a_single_label_is_refused(tmp_path):
    import pytest

    from lorafit.errors import UserError

    for name in ("t.csv", "e.csv"):
        (tmp_path / name).write_text("text,label\n" + "".join(f"row {i},spam\n" for i in range(8)))
    cfg = compose("model=tiny-bert", "data=files", f"data.train_file={tmp_path / 't.csv'}", f"data.eval_file={tmp_path / 'e.csv'}")
    with pytest.raises(UserError, match="one label .'spam'.*at least two"):
        load_splits(cfg)


def test_without_an_eval_file_a_stratified_seeded_split_is_held_out(caplog):
    import logging
    from collections import Counter

    from conftest import CLS_TRAIN

    caplog.set_level(logging.INFO, logger="lorafit.data")
    cfg = compose("model=tiny-bert", "data=files", f"data.train_file={CLS_TRAIN}", "data.eval_fraction=0.2")
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.eval)) == (192, 48)  # of 240 rows, 80 per class
    assert Counter(splits.eval["label"]) == {0: 16, 1: 16, 2: 16}  # stratified: each class 20% held out
    assert not set(splits.eval["text"]) & set(splits.train["text"])
    again = load_splits(compose("model=tiny-bert", "data=files", f"data.train_file={CLS_TRAIN}", "data.eval_fraction=0.2",
                                "train.seed=7"))
    assert again.eval["text"] == splits.eval["text"]  # the same held-out rows whatever train.seed is
    assert "held out 48 of 240 rows" in caplog.text and "stratified by label" in caplog.text


def test_sft_without_an_eval_file_holds_out_rows(write_jsonl):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    splits = load_splits(compose("model=tiny-llama", "data=sft", f"data.train_file={write_jsonl('t.jsonl', rows)}"))
    assert (len(splits.train), len(splits.eval)) == (45, 5)
    tiny = compose("model=tiny-llama", "data=sft", f"data.train_file={write_jsonl('s.jsonl', rows[:1])}",
                   "data.eval_fraction=0.1")
    with pytest.raises(UserError, match="can't hold out data.eval_fraction=0.1 of 1 rows.*pass data.eval_file"):
        load_splits(tiny)


def test_hub_dataset_by_name_loads_through_datasets(tmp_path):
    """data.hf_dataset goes through datasets.load_dataset: a local dataset dir here; offline, a hub id fails in one
    line that says what to do."""
    repo = tmp_path / "org_news"
    repo.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps({"instruction": f"Sum {i}", "output": str(i)}) + "\n"
                                                     for i in range(n)))
    cfg = compose("model=tiny-llama", "data=sft", f"data.hf_dataset={repo}", "data.hf_eval_split=test")
    splits = load_splits(cfg)
    assert (len(splits.train), len(splits.eval)) == (40, 10)
    assert len(load_splits(compose("model=tiny-llama", "data=sft", f"data.hf_dataset={repo}")).eval) == 4  # held out
    train, _ = tokenize(splits, build_tokenizer(cfg.model), cfg)  # alpaca, detected
    assert len(train) == 40
    with pytest.raises(UserError, match="data.hf_dataset='someorg/missing-set' .* could not be loaded .* Offline\\? Save it"):
        load_splits(compose("model=tiny-llama", "data=sft", "data.hf_dataset=someorg/missing-set"))


def test_mix_interleaves_sources_of_different_formats_by_weight(write_jsonl):
    alpaca = write_jsonl("a.jsonl", [{"instruction": f"a{i}", "output": f"A{i}"} for i in range(60)])
    sharegpt = write_jsonl("s.jsonl", [{"conversations": [{"from": "human", "value": f"s{i}"}, {"from": "gpt", "value": f"S{i}"}]}
                                       for i in range(10)])
    mix = f"data.mix=[{{train_file: {alpaca}, weight: 3}}, {{train_file: {sharegpt}, weight: 1}}]"
    splits = load_splits(compose("model=tiny-llama", "data=sft", mix, "data.eval_fraction=0.1"))
    rows = list(splits.train) + list(splits.eval)
    assert all(set(r) == {"messages"} for r in rows)  # every source as messages
    firsts = [r["messages"][0]["content"] for r in rows]
    assert set(firsts) >= {f"a{i}" for i in range(60)} | {f"s{i}" for i in range(10)}  # over: every row is used
    share = sum(f.startswith("s") for f in firsts) / len(firsts)
    assert 0.18 < share < 0.32  # sampled at weight 1 / (3 + 1), small source repeated
    under = load_splits(compose("model=tiny-llama", "data=sft", mix, "data.mix_strategy=under", "data.eval_fraction=0.1"))
    assert len(under.train) + len(under.eval) < 60  # stops when the small source runs out
    with pytest.raises(UserError, match="data.mix\\[0\\].train_file=.* has no column .text."):
        load_splits(compose("model=tiny-bert", "data=files", f"data.mix=[{{train_file: {alpaca}}}]"))
