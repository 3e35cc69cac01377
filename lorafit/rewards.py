"""Reward functions for objective=grpo, and the one place that calls them.

A reward is any Python function named in the config, TRL's signature:

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float]

`prompts` are the rows' prompts as the dataset holds them (a string, or a list of messages), `completions` the
generated replies as strings, `completion_ids` their token ids, and `columns` every other column of the dataset
(e.g. `answer`), one value per completion. It returns one finite float per completion. The config lists them with
a weight and any keyword arguments:

    objective.rewards: [{_target_: lorafit.rewards.exact_match, column: answer, weight: 1.0},
                        {_target_: mypkg.rewards.brevity, weight: 0.2}]

The shipped ones cover what verifiable-reward tasks mostly need: a label or answer matched exactly, a number
matched (the last one, or a \\boxed{} one), a format checked by a regex, and a penalty on length.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable

from lorafit.errors import UserError

# ---- the shipped rewards ----

NORMALIZERS = {
    "none": lambda s: s,
    "strip": lambda s: s.strip(),
    "lower": lambda s: s.strip().lower(),
    # lower case, punctuation gone, whitespace collapsed: SQuAD's normalization without its article removal
    "words": lambda s: " ".join(s.lower().translate(str.maketrans("", "", string.punctuation)).split()),
}


MATCHES = ("whole", "first_word", "contains")


def exact_match(prompts, completions, column: str = "answer", normalize: str = "words", match: str = "whole",
                **columns) -> list[float]:
    """1.0 where the completion matches the row's `column` after `normalize` (none | strip | lower | words), else 0.
    match: whole (the completion is the answer), first_word (its first word is: a one-word answer followed by
    chatter counts), contains (the answer's words appear in it, in order, as whole words: partial credit for a
    model that answers in a sentence)."""
    norm = _normalizer(normalize)
    if match not in MATCHES:
        raise UserError(f"lorafit.rewards.exact_match: match={match!r} must be one of {', '.join(MATCHES)}")
    out = []
    for c, a in zip(completions, _column(columns, column, "exact_match")):
        got, want = norm(c), norm(str(a))
        if match == "first_word":
            got = (got.split() or [""])[0]
        hit = f" {want} " in f" {got} " if match == "contains" else got == want
        out.append(float(hit))
    return out


def choice_match(prompts, completions, column: str = "answer", choices=(), **columns) -> list[float]:
    """1.0 where the completion names exactly one of `choices` (as whole words, case and punctuation ignored) and
    it is the row's `column`, else 0: a multiple-choice answer checked wherever in the reply it is given, while a
    reply that lists several choices (hedging) gets nothing."""
    norm = NORMALIZERS["words"]
    options = {norm(str(c)) for c in choices}
    if not options:
        raise UserError("lorafit.rewards.choice_match needs choices: [the possible answers]")
    out = []
    for c, a in zip(completions, _column(columns, column, "choice_match")):
        words = f" {norm(c)} "
        named = {o for o in options if f" {o} " in words}
        out.append(float(named == {norm(str(a))}))
    return out


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def number(text: str, where: str = "last") -> float | None:
    """The number a math answer gives: inside the last \\boxed{...} (where=boxed), or the last number in the text
    (where=last: the boxed one when there is one). Thousands separators are ignored. None when there is none."""
    boxed = _BOXED.findall(text)
    if boxed:
        text = boxed[-1]
    elif where == "boxed":
        return None
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def number_match(prompts, completions, column: str = "answer", where: str = "last", tolerance: float = 1e-6,
                 **columns) -> list[float]:
    """1.0 where the completion's number (see `number`) equals the row's `column` within `tolerance`, else 0.
    The column may hold a number, or text whose number counts (GSM8K's "... #### 72")."""
    if where not in ("last", "boxed"):
        raise UserError(f"lorafit.rewards.number_match: where={where!r} must be last or boxed")
    out = []
    for c, a in zip(completions, _column(columns, column, "number_match")):
        want = float(a) if isinstance(a, (int, float)) else number(str(a).split("####")[-1])
        got = number(c, where)
        out.append(float(got is not None and want is not None and abs(got - want) <= tolerance))
    return out


def regex_format(prompts, completions, pattern: str = r"^\s*\S+\s*$", full: bool = True, **columns) -> list[float]:
    """1.0 where the completion matches `pattern` (the whole completion with full, else anywhere), else 0. The
    default asks for a single word."""
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise UserError(f"lorafit.rewards.regex_format: pattern={pattern!r} is not a valid regex: {e}") from None
    match = rx.fullmatch if full else rx.search
    return [float(match(c) is not None) for c in completions]


def length_penalty(prompts, completions, completion_ids=None, target: int = 0, per_token: float = 1.0,
                   **columns) -> list[float]:
    """A negative reward for length: 0 up to `target` tokens, then -1 for every `per_token` tokens more
    (per_token=32: -1 at 32 tokens too many). Counts tokens when given them, else words."""
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c.split()) for c in completions]
    return [-max(0, n - target) / per_token for n in lengths]


def _normalizer(name: str) -> Callable[[str], str]:
    if name not in NORMALIZERS:
        raise UserError(f"lorafit.rewards: normalize={name!r} must be one of {', '.join(NORMALIZERS)}")
    return NORMALIZERS[name]


def _column(columns: dict, name: str, fn: str) -> list:
    if name not in columns:
        raise UserError(f"lorafit.rewards.{fn}: the data has no column {name!r} (set column=...); its columns are: "
                        f"{', '.join(c for c in columns if c != 'completion_ids') or 'none besides the prompt'}")
    return columns[name]


# ---- calling them ----

@dataclass
class Reward:
    name: str  # how metrics name it: train/reward/NAME
    fn: Callable
    weight: float


def build(entries) -> list[Reward]:
    """objective.rewards -> Reward functions, each a hydra `_target_` with its keyword arguments bound. Two entries
    of one function get distinct names (exact_match, exact_match_2)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    out, seen = [], {}
    for i, entry in enumerate(entries):
        entry = OmegaConf.to_container(entry) if OmegaConf.is_config(entry) else dict(entry)
        target = entry.get("_target_")
        if not target:
            raise UserError(f"objective.rewards[{i}] has no _target_ (e.g. {{_target_: lorafit.rewards.exact_match, "
                            "weight: 1.0}})")
        weight = entry.pop("weight", 1.0)
        try:
            fn = instantiate(entry, _partial_=True)
        except Exception as e:  # hydra wraps the import error of a module or name that is not there
            raise UserError(f"objective.rewards[{i}]: _target_={target!r} can't be imported "
                            f"({str(e).splitlines()[0][:160]})") from None
        base = target.rsplit(".", 1)[-1]
        seen[base] = seen.get(base, 0) + 1
        out.append(Reward(base if seen[base] == 1 else f"{base}_{seen[base]}", fn, float(weight)))
    return out


def score(rewards: list[Reward], prompts: list, completions: list[str], completion_ids: list[list[int]],
          columns: dict[str, list]) -> list[list[float]]:
    """Each reward's values, [reward][completion]. A reward that raises, returns the wrong count or a value that is
    not a finite number is named in one line, with the row."""
    out = []
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"reward {r.name} raised {type(e).__name__}: {str(e)[:200]} (first completion: "
                            f"{completions[0][:80]!r})") from None
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise UserError(f"reward {r.name} returned {len(values)} values for {len(completions)} completions: it must "
                            "return one float per completion")
        floats = []
        for i, v in enumerate(values):
            f = _as_float(v)
            if f is None or not math.isfinite(f):
                raise UserError(f"reward {r.name} returned {v!r} for completion {i} ({completions[i][:80]!r}, prompt "
                                f"{str(prompts[i])[:80]!r}): rewards must be finite numbers")
            floats.append(f)
        out.append(floats)
    return out


def _as_float(v) -> float | None:
    """A number of any kind (int, bool, numpy or 0-d torch scalar) as a float; None for anything else."""
    if isinstance(v, (str, bytes)) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
