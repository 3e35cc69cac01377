"""Every GLUE recipe end to end, up to the hub download: `recipe=glue_TASK` on tiny-roberta, with GLUE-shaped data
in place of `load_dataset("nyu-mll/glue", TASK)` (the hub is not reachable here). The stand-in has the task's real
schema: its columns, split names (MNLI's validation_matched / validation_mismatched) and ClassLabel names, so the
recipe's own path (columns, labels, regression head, eval split, metric) is what runs. Each task's GLUE metric is
asserted: MCC for CoLA, Pearson and Spearman for STS-B, F1 and accuracy for MRPC and QQP, and matched and
mismatched accuracy for MNLI."""

from __future__ import annotations

import math
import random

import pytest
from conftest import run_inprocess

# task: (text columns, ClassLabel names or None for STS-B's float score, eval splits)
SCHEMAS = {
    "cola": (("sentence",), ["unacceptable", "acceptable"], ["validation"]),
    "sst2": (("sentence",), ["negative", "positive"], ["validation"]),
    "mrpc": (("sentence1", "sentence2"), ["not_equivalent", "equivalent"], ["validation"]),
    "qqp": (("question1", "question2"), ["not_duplicate", "duplicate"], ["validation"]),
    "stsb": (("sentence1", "sentence2"), None, ["validation"]),
    "mnli": (("premise", "hypothesis"), ["entailment", "neutral", "contradiction"],
             ["validation_matched", "validation_mismatched"]),
    "qnli": (("question", "sentence"), ["entailment", "not_entailment"], ["validation"]),
    "rte": (("sentence1", "sentence2"), ["entailment", "not_entailment"], ["validation"]),
}
CUES = ["match goal striker", "market shares bank", "software chip phone"]  # the label is in the text: learnable


def glue_like(task: str):
    """A DatasetDict shaped as nyu-mll/glue's TASK: the label is written into the first text column as a cue."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    columns, names, evals = SCHEMAS[task]
    rng, filler = random.Random(0), "the a of and to in is was for on with as by at from".split()
    features = Features({**{c: Value("string") for c in columns},
                         "label": Value("float32") if names is None else ClassLabel(names=names), "idx": Value("int32")})

    def split(n: int, test: bool = False) -> Dataset:
        rows = {c: [] for c in features}
        for i in range(n):
            k = i % (len(names) if names else 3)
            for j, c in enumerate(columns):
                words = rng.sample(filler, 6) + (CUES[k].split() if j == 0 else [])
                rng.shuffle(words)
                rows[c].append(" ".join(words))
            rows["label"].append(-1 if test and names else 2.5 * k if names is None else k)  # GLUE's test: no labels
            rows["idx"].append(i)
        return Dataset.from_dict(rows, features=features)

    tests = [s.replace("validation", "test") for s in evals]
    return DatasetDict({"train": split(96), **{s: split(24) for s in evals}, **{s: split(8, True) for s in tests}})


@pytest.fixture
def offline_glue(monkeypatch):
    """`datasets.load_dataset("nyu-mll/glue", task)` answers with glue_like(task); any other call is refused."""
    import datasets

    calls = []

    def load_dataset(path, name=None, *args, **kwargs):
        assert path == "nyu-mll/glue" and not args and not kwargs, (path, name, args, kwargs)
        calls.append(name)
        return glue_like(name)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("task", list(SCHEMAS))
def test_glue_recipe_runs_end_to_end_on_tiny_roberta(task, offline_glue, tmp_path):
    from lorafit.config import CONF_DIR

    recipe = (CONF_DIR / "recipe" / f"glue_{task}.yaml").read_text()
    assert "override /model: roberta-base" in recipe and f"task: {task}" in recipe  # the hub's model and data stay
    run_dir, summary = run_inprocess(tmp_path, f"recipe=glue_{task}", "model=tiny-roberta", "train.max_steps=12",
                                     "data.max_length=32", "train.batch_size=8", "train.eval_every=0", "train.save_every=0",
                                     "train.mixed_precision=no", "train.lr=2e-2", "hooks=[save_adapter]")
    assert offline_glue == [task]
    ev = summary["eval"]
    expected = {"cola": "mcc", "stsb": "pearson"}.get(task, "accuracy")
    assert summary["primary_metric"] == expected and math.isfinite(ev[expected])
    if task == "stsb":
        assert -1 <= ev["pearson"] <= 1 and -1 <= ev["spearman"] <= 1 and ev["n"] == 24
    else:
        assert 0 <= ev["accuracy"] <= 1 and -1 <= ev["mcc"] <= 1 and ev["n"] == 24
    if task in ("mrpc", "qqp"):
        assert 0 <= ev["f1"] <= 1
    if task == "mnli":  # both dev sets, as GLUE reports MNLI
        assert ev["mismatched_n"] == 24 and 0 <= ev["mismatched_accuracy"] <= 1
    import json

    info = json.loads((run_dir / "adapter" / "lorafit.json").read_text())
    names = SCHEMAS[task][1]
    assert info["labels"] == (["score"] if names is None else names)  # the ClassLabel names name the classes
    assert info["data"]["text_columns"] == list(SCHEMAS[task][0])
