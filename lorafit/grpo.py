"""objective=grpo: reinforcement learning from rewards that a program checks (GRPO and its DAPO / Dr. GRPO variants).

Each step the loop hands the objective a micro-batch of prompts, and `rollout` turns it into a training batch:
1. sample objective.num_generations (G) completions per prompt with the policy itself (the adapter on, KV cache,
   batched);
2. score them with the reward functions of the config (lorafit/rewards.py) and weigh them into one reward each;
3. normalize each reward within its prompt's group: the advantage A = (r - mean_group) / (std_group + 1e-4);
4. keep, per completion token, the old policy's log-probability (μ = objective.iterations > 1 only: with one update
   per rollout the ratio is exactly 1, as in TRL) and, with β > 0, the reference's.

`loss` is then the clipped surrogate of PPO per token, -min(ρA, clip(ρ, 1-ε, 1+ε_high)A), plus β·KL(k3) to the
reference, summed per completion; the loop divides by the units of the loss type (completions for grpo,
completions x max_new_tokens for dr_grpo, completion tokens for dapo): TRL's GRPOTrainer's normalizations, checked
against its numbers in bench/grpo.py.

Sampling is reproducible by construction: a completion's tokens are drawn by Gumbel-max from its own generator,
seeded by (train.seed, rollout, prompt row, g). So 2 processes sample what 1 does, and a resumed run samples what
the killed one would have, whatever the global RNG holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

import torch

from lorafit import rewards as reward_fns
from lorafit.objectives import Objective, as_reference, target_logits

PROMPT_KEYS = ("input_ids", "attention_mask", "prompt_id")  # the tokenized prompt; every other column goes to the rewards


# ---- the losses: per-token tensors (completions, positions) -> per-completion sums and their units ----

def advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalized advantages of rewards laid out group by group (G completions of prompt 0, then of prompt
    1, ...): r - the group's mean, over the group's std (unbiased, + 1e-4) with scale=group, or unscaled with none
    (Dr. GRPO). Returns (advantages, each group's std)."""
    grouped = rewards.view(-1, group)
    std = grouped.std(1) if group > 1 else torch.zeros(len(grouped), dtype=rewards.dtype, device=rewards.device)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (std[:, None] + 1e-4)
    return adv.reshape(-1), std


def token_losses(logp, old, ref, adv, mask, o) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate per token with the ratio ρ = exp(logp - old), plus β times the k3 estimate of
    KL(policy ‖ reference), exp(ref - logp) - (ref - logp) - 1 (Schulman's; GRPO paper eq. 4), times ρ with
    objective.kl_correction (TRL's default, use_bias_correction_kl). Returns the
    per-token loss and the per-token clip and KL indicators for the metrics (TRL's clip_ratio/region_mean)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - o.epsilon, 1 + _eps_high(o)) * a)
    clipped = ((ratio < 1 - o.epsilon) & (a < 0)) | ((ratio > 1 + _eps_high(o)) & (a > 0))
    kl = None
    if o.beta:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if o.kl_correction:  # DeepSeek-V3.2's: times ρ, an unbiased reverse-KL gradient (its value is k3 where ρ = 1)
            kl = kl * ratio
        loss = loss + o.beta * kl
    return loss, {"clipped": clipped, "kl": kl}


def _eps_high(o) -> float:
    return o.epsilon if o.epsilon_high is None else o.epsilon_high


def grpo_sums(loss, mask, o):
    """GRPO (Shao et al. 2024): each completion's mean over its tokens; the loop averages over completions."""
    m = mask.to(loss.dtype)
    return (loss * m).sum(1) / m.sum(1).clamp(min=1)


def token_sums(loss, mask, o):
    """DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025): each completion's sum over its tokens; the loop divides
    by all completion tokens (dapo) or by completions x max_new_tokens (dr_grpo), so long replies are not
    down-weighted."""
    return (loss * mask.to(loss.dtype)).sum(1)


LOSS_TYPES = {"grpo": grpo_sums, "dapo": token_sums, "dr_grpo": token_sums}


def units(batch: dict, o) -> torch.Tensor:
    """What a rollout batch's loss is a sum over, by loss type (see LOSS_TYPES)."""
    mask = batch["labels"][:, 1:] != -100
    if o.loss_type == "dapo":
        return mask.sum()
    return torch.tensor(len(mask) * (o.max_new_tokens if o.loss_type == "dr_grpo" else 1))


def token_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """Per-token log-probabilities of each row's completion tokens, (rows, length - 1) aligned with labels[:, 1:]
    (0 where there is no target), from the logits over the sampling temperature, as the tokens were drawn."""
    logits, targets, _ = target_logits(model, batch)
    lp = (logits / temperature).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    out = torch.zeros(batch["labels"][:, 1:].shape, dtype=lp.dtype, device=lp.device)
    return out.masked_scatter(batch["labels"][:, 1:] != -100, lp)


# ---- generation ----

class RowSampler:
    """A logits processor that samples by Gumbel-max (argmax of logits/T + Gumbel noise, top-p filtered first), with
    one generator per row: generate() runs greedy over its scores, so each row's tokens depend on its own seed alone,
    not on the other rows of its batch or process."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
        return scores + gumbel.to(scores.device, scores.dtype)


def complete(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, accelerator, sampler=None,
             synced: bool = False, copies: int = 1) -> tuple[list[list[int]], list[bool]]:
    """`copies` completions of each token-id prompt (copies of a prompt side by side), batched with left padding and
    a KV cache: greedy, or sampled by `sampler`. Each prompt is read once: its cache is computed for one copy and
    repeated for the others, so a group of G costs one prompt forward, not G (the prompt, hundreds of tokens, is
    most of a short completion's cost). Returns each completion's ids up to and including its end-of-sequence
    token, and whether it was cut at max_new_tokens without one. The seam for an external generator (vLLM) is
    this function."""
    from transformers import GenerationConfig, LogitsProcessorList

    eos = _eos_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=accelerator.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=accelerator.device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            cache = _shared_prefix(inner, ids, mask, copies) if copies > 1 and width > 1 else None
            ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
            out = inner.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced,
                                 past_key_values=cache, logits_processor=LogitsProcessorList([sampler] if sampler else []))
    finally:
        inner.train(was_training)
    completions, truncated = [], []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        completions.append(row if end is None else row[: end + 1])
        truncated.append(end is None)
    return completions, truncated


def _shared_prefix(model, ids, mask, copies: int):
    """The KV cache of every prompt but its last token (generate's first step reads that one), computed once per
    prompt and repeated `copies` times; None where the model's cache can't be repeated (generate then reads each
    copy's prompt itself)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers left-padded rows
    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                  use_cache=True).past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(copies)
    return cache


def _eos_ids(model, tokenizer) -> list[int]:
    """What ends a reply: the generation config's end-of-sequence ids (SmolLM2-Instruct's <|im_end|>), else the
    tokenizer's."""
    inner = model.module if hasattr(model, "module") else model
    eos = getattr(getattr(inner, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos)


# ---- the objective ----

def build(cfg, accelerator, tokenizer, run_dir: Path) -> Objective:
    from lorafit import checkpoint

    o, seed = cfg.objective, cfg.train.seed
    rewards = reward_fns.build(o.rewards)
    synced = accelerator.distributed_type in checkpoint.SHARDED  # a sharded model needs every process in each forward

    def rollout(model, batch: dict, key: int) -> dict:
        """A prompt micro-batch -> G completions per prompt, scored, as a training batch of tensors."""
        t0 = time.perf_counter()
        prompts = _prompt_ids(batch)
        ids = [p for p in prompts for _ in range(o.num_generations)]
        seeds = [_seed(seed, key, pid, g) for pid in batch["prompt_id"].tolist() for g in range(o.num_generations)]
        completions, truncated = complete(model, prompts, tokenizer, o.max_new_tokens, accelerator,
                                          RowSampler(seeds, o.temperature, o.top_p), synced, copies=o.num_generations)
        t_gen = time.perf_counter() - t0
        per_fn = _score(rewards, batch, completions, o.num_generations, tokenizer)
        weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        total = (per_fn * weights[:, None]).sum(0)
        adv, std = advantages(total, o.num_generations, o.scale_rewards)
        out = _training_batch(ids, completions, truncated if o.mask_truncated else None, tokenizer.pad_token_id)
        out = {k: v.to(accelerator.device) for k, v in out.items()}
        out["advantages"] = adv.to(accelerator.device)
        if o.iterations > 1:  # the policy that sampled, for the ratio of the later updates
            with _no_grad_eval(model):
                out["old_logps"] = token_logps(model, out, o.temperature)
        if o.beta:
            with as_reference(model, accelerator):
                out["ref_logps"] = token_logps(model, out, o.temperature)
        n, lengths = len(ids), torch.tensor([len(c) for c in completions], dtype=torch.float32)
        stats = {"reward": (total.sum(), n), "reward_std": (std.sum(), len(std)),
                 **{f"reward/{r.name}": (per_fn[i].sum(), n) for i, r in enumerate(rewards)},
                 "completion_length": (lengths.sum(), n), "truncated_fraction": (float(sum(truncated)), n),
                 "generate_s": (t_gen, 1)}
        out.update({f"stat:{k}": torch.tensor([float(s), float(c)], device=accelerator.device) for k, (s, c) in stats.items()})
        return out

    def loss(model, batch: dict):
        logp = token_logps(model, batch, o.temperature)
        mask = batch["labels"][:, 1:] != -100
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()  # μ = 1: ρ = 1, TRL's shortcut
        per_token, flags = token_losses(logp, old, batch.get("ref_logps"), batch["advantages"], mask, o)
        m = mask.to(per_token.dtype)
        stats = {k[5:]: v for k, v in batch.items() if k.startswith("stat:")}
        stats["clip_ratio"] = torch.stack([(flags["clipped"] * m).sum(), m.sum()])
        if flags["kl"] is not None:
            stats["kl"] = torch.stack([(flags["kl"].detach() * m).sum(), m.sum()])
        return LOSS_TYPES[o.loss_type](per_token, mask, o), stats

    @torch.no_grad()
    def evaluate(model, batches, step: int) -> dict:
        """Greedy completions of every held-out prompt once: the mean weighted reward (eval/reward, the primary
        metric) and each reward's, with the samples in generations.jsonl and the W&B table."""
        from lorafit.generate import write_samples

        scores, samples = [], []
        for batch in batches:
            completions, truncated = complete(model, _prompt_ids(batch), tokenizer, o.max_new_tokens, accelerator,
                                              synced=synced)
            per_fn = _score(rewards, batch, completions, 1, tokenizer)
            weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
            total = (per_fn * weights[:, None]).sum(0)
            lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
            rows = torch.stack([total, *per_fn, lengths, torch.tensor(truncated, dtype=torch.float32)], 1).double()
            scores.append(accelerator.gather_for_metrics(rows.to(accelerator.device)).cpu())
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            mine = [{"step": step, "prompt": tokenizer.decode(p, skip_special_tokens=False), "output": t,
                     "reward": float(r), **_answers(batch, i)}
                    for i, (p, t, r) in enumerate(zip(_prompt_ids(batch), texts, total))]
            samples += accelerator.gather_for_metrics(mine, use_gather_object=True)
        s = torch.cat(scores)
        write_samples(samples, run_dir, cfg, accelerator, step)
        return {"reward": float(s[:, 0].mean()),
                **{f"reward/{r.name}": float(s[:, 1 + i].mean()) for i, r in enumerate(rewards)},
                "completion_length": float(s[:, -2].mean()), "truncated_fraction": float(s[:, -1].mean()), "n": len(s)}

    return Objective(units=lambda b: units(b, o), loss=loss, evaluate=evaluate, rollout=rollout,
                     iterations=o.iterations)


def _seed(seed: int, key: int, prompt: int, g: int) -> int:
    """Completion g of prompt row `prompt` in the rollout of micro-batch `key`: its sampling seed, the same on any
    process, Python or machine."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}:{prompt}:{g}".encode(), digest_size=8).digest()) >> 1


@contextlib.contextmanager
def _no_grad_eval(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _prompt_ids(batch: dict) -> list[list[int]]:
    """The micro-batch's prompts without their (right) padding."""
    return [ids[: int(n)] for ids, n in zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1).tolist())]


def _columns(batch: dict) -> dict[str, list]:
    return {k: v for k, v in batch.items() if k not in PROMPT_KEYS}


def _answers(batch: dict, i: int) -> dict:
    """Row i's other columns for the samples file: strings (their first 200 characters) and numbers, what a person
    reads beside the output (the answer a reward checks it against)."""
    return {k: v[i][:200] if isinstance(v[i], str) else v[i] for k, v in _columns(batch).items()
            if k not in ("prompt", "messages") and isinstance(v[i], (str, int, float))}


def _score(rewards, batch: dict, completions: list[list[int]], group: int, tokenizer) -> torch.Tensor:
    """(rewards, completions) values, every prompt's columns repeated for its G completions."""
    columns = {k: [v for v in vals for _ in range(group)] for k, vals in _columns(batch).items()}
    # the prompts as the data holds them (TRL's convention); a templated one as the text the model saw
    prompts = columns.get("prompt") or columns.get("messages") or \
        [tokenizer.decode(p) for p in _prompt_ids(batch) for _ in range(group)]
    columns.pop("prompt", None)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return torch.tensor(reward_fns.score(rewards, prompts, texts, completions, columns), dtype=torch.float32)


def _training_batch(prompts, completions, truncated, pad_id: int) -> dict:
    """Prompt + completion rows, right-padded, with labels on the completion tokens (none on a truncated one when
    objective.mask_truncated: DAPO's overlong filtering)."""
    from lorafit.data import collate

    rows = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        keep = not (truncated and truncated[i])
        rows.append({"input_ids": p + c, "attention_mask": [1] * (len(p) + len(c)),
                     "labels": [-100] * len(p) + (c if keep else [-100] * len(c))})
    return collate(rows, pad_id)


def to_safetensors(batches: list[dict]) -> dict[str, torch.Tensor]:
    """A rollout buffer (objective.iterations > 1) as flat tensors, for a checkpoint taken inside it."""
    return {f"{i}/{k}": v.contiguous().cpu() for i, b in enumerate(batches) for k, v in b.items()}


def from_safetensors(flat: dict[str, torch.Tensor], device) -> list[dict]:
    out: dict[int, dict] = {}
    for key, v in flat.items():
        i, k = key.split("/", 1)
        out.setdefault(int(i), {})[k] = v.to(device)
    return [out[i] for i in sorted(out)]
