"""Task metrics with scikit-learn / scipy (the `evaluate` library needs the hub).

Each task has one primary metric -- the number sweeps compare and `summary.json` headlines -- chosen as GLUE
does: Matthews correlation for CoLA, Pearson for STS-B, accuracy elsewhere, perplexity for causal LM.
"""

from __future__ import annotations

import math
import re

import numpy as np

BINARY_F1_TASKS = ("mrpc", "qqp")


def mean(xs) -> float:
    """Mean of the values that are set (nan when none is)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def problem_type(cfg) -> str:
    """language_model | regression | classification: the one place that decides it (head, loss, metrics)."""
    if cfg.model.task == "causal_lm":
        return "language_model"
    if cfg.data.get("problem_type") is not None:  # data=files: the user's choice (float labels are refused without it)
        return str(cfg.data.problem_type)
    return "regression" if cfg.data.source == "glue" and cfg.data.task == "stsb" else "classification"


def primary_metric(cfg) -> str:
    """The eval metric this config is judged by (what summary.json, sweeps and the sweeper read)."""
    objective = (cfg.get("objective") or {}).get("name", "sft")
    if objective == "grpo":  # RL: the mean reward of greedy replies to held-out prompts
        return "reward"
    if objective != "sft":  # a preference run: is the chosen reply preferred?
        return "reward_accuracy"
    problem = problem_type(cfg)
    if problem == "language_model":
        return "perplexity"
    if problem == "regression":
        return "pearson"
    return "mcc" if cfg.data.source == "glue" and cfg.data.task == "cola" else "accuracy"


def higher_is_better(metric: str) -> bool:
    return metric not in ("perplexity", "loss", "mse")


def classification(preds: np.ndarray, labels: np.ndarray, glue_task: str | None = None) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    average = "binary" if glue_task in BINARY_F1_TASKS else "macro"
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, average=average)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


def regression(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    return {"pearson": float(pearsonr(preds, labels)[0]), "spearman": float(spearmanr(preds, labels)[0]),
            "mse": float(np.mean((preds - labels) ** 2))}


def language_model(loss_sum: float, n_tokens: int) -> dict[str, float]:
    loss = loss_sum / max(n_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# rouge-score's default tokenizer keeps [a-z0-9] only, so a reply in Chinese or Russian has no tokens and scores 0
# even when it is the reference itself. Words are runs of Unicode letters and digits instead (the same tokens as the
# default for ASCII text); CJK and kana, written without spaces, count one character at a time, as in CJK ROUGE.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORDS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def rouge_tokens(text: str) -> list[str]:
    return _WORDS.findall(text.lower())


def generation(outputs: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping whitespace) and ROUGE-L F1 (google's rouge-score, as HF evaluate uses, over
    rouge_tokens) of generated replies against the reference replies."""
    from types import SimpleNamespace

    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=SimpleNamespace(tokenize=rouge_tokens))
    return {"exact_match": mean([float(o.strip() == r.strip()) for o, r in zip(outputs, references)]),
            "rouge_l": mean([scorer.score(r, o)["rougeL"].fmeasure for o, r in zip(outputs, references)])}
