"""What the training loop minimizes: one small `Objective` per `objective=` choice, built from plain functions.

The loop knows three things of an objective: how many *units* a micro-batch holds (target tokens for SFT and
classification, pairs for DPO/IPO/SimPO/ORPO, rows for KTO), the *sum* of the unit losses (it divides by the
global unit count, so accumulation and DDP give one big batch's gradient), and how to *evaluate*. The preference
losses themselves are functions of sequence log-probabilities, written after TRL's DPOTrainer, CPOTrainer,
ORPOTrainer and KTOTrainer (whose losses are inline in the trainers, not importable) and checked against their
numbers in bench/preference.py.

Preference batches hold 2B rows, the B chosen replies then the B rejected ones, so both go through the policy in
one forward. The reference is the same model with its adapter switched off (`disable_adapter()`), or, after
`lora.init_from`, the frozen copy of the starting adapter, loaded as a second adapter named "ref".
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lorafit import metrics
from lorafit.adapters import REF_ADAPTER

REFERENCE_FREE = ("simpo", "orpo")  # no reference forward during training (eval/kl still measures against one)


# ---- the losses: sequence log-probabilities -> (per-unit loss, chosen reward, rejected reward) ----
# pol_c / pol_r: summed log-probabilities of the chosen / rejected replies under the policy; ref_*: the same under
# the reference; n_*: their token counts; o: the objective config (beta, label_smoothing, gamma).

def dpo(pol_c, pol_r, ref_c, ref_r, n_c, n_r, o):
    """DPO (Rafailov et al. 2023), with conservative label smoothing (cDPO) as TRL's `sigmoid` loss."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    losses = -F.logsigmoid(o.beta * h) * (1 - o.label_smoothing) - F.logsigmoid(-o.beta * h) * o.label_smoothing
    return losses, o.beta * (pol_c - ref_c), o.beta * (pol_r - ref_r)


def ipo(pol_c, pol_r, ref_c, ref_r, n_c, n_r, o):
    """IPO (Azar et al. 2023): (h - 1/(2β))², with h from length-averaged log-ratios, as TRL does. The rewards
    are DPO's implicit ones (β · summed log-ratio), as TRL logs them."""
    h = (pol_c - ref_c) / n_c - (pol_r - ref_r) / n_r
    return (h - 1 / (2 * o.beta)) ** 2, o.beta * (pol_c - ref_c), o.beta * (pol_r - ref_r)


def simpo(pol_c, pol_r, ref_c, ref_r, n_c, n_r, o):
    """SimPO (Meng et al. 2024): reference-free, β times the length-averaged log-probability margin, minus γ.
    TRL's CPOTrainer(loss_type='simpo') with cpo_alpha=0; its rewards are β · average log-probability."""
    c, r = o.beta * pol_c / n_c, o.beta * pol_r / n_r
    h = c - r - o.gamma
    losses = -F.logsigmoid(h) * (1 - o.label_smoothing) - F.logsigmoid(-h) * o.label_smoothing
    return losses, c, r


def orpo(pol_c, pol_r, ref_c, ref_r, n_c, n_r, o):
    """ORPO (Hong et al. 2024): the chosen reply's NLL (per token) minus β · log σ(log-odds ratio), on
    length-averaged log-probabilities; reference-free. TRL's ORPOTrainer; rewards β · average log-probability."""
    c, r = pol_c / n_c, pol_r / n_r
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    return -c - o.beta * F.logsigmoid(log_odds), o.beta * c, o.beta * r


def kto(pol, ref, desirable, o, z):
    """KTO (Ethayarajh et al. 2024) on unpaired rows: desirable rows are pulled above the reference point z, the
    others pushed below it. z is a detached, non-negative estimate of KL(policy ‖ reference) (see kto_reference_point).
    Returns (per-row loss, per-row reward β·log-ratio)."""
    reward = pol - ref
    losses = torch.where(desirable, o.desirable_weight * (1 - torch.sigmoid(o.beta * (reward - z))),
                         o.undesirable_weight * (1 - torch.sigmoid(o.beta * (z - reward))))
    return losses, o.beta * reward


def kto_reference_point(pol, ref, accelerator):
    """KTO's z: the mean log-ratio over the step's rows on every process, clamped at 0 and detached. TRL estimates
    it from mismatched (prompt, completion) pairs, at the cost of a third forward; lorafit takes the matched rows
    (Ethayarajh et al.'s own simplification when the batch is small), so z is one number per micro-batch."""
    total = accelerator.reduce(torch.stack([(pol - ref).detach().sum(), torch.tensor(float(len(pol)), device=pol.device)]),
                               "sum")
    return (total[0] / total[1]).clamp(min=0)


PAIR_LOSSES = {"dpo": dpo, "ipo": ipo, "simpo": simpo, "orpo": orpo}


# ---- log-probabilities ----

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def target_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal LM's float logits at the positions that predict a target, (targets in the batch, vocab), with those
    targets and the row each belongs to."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    targets = batch["labels"][:, 1:]  # token t predicts token t+1
    is_target = targets != -100
    keep = F.pad(is_target, (0, 1))  # the positions that predict a target
    inputs["use_cache"] = False  # no KV cache to build; and with one, transformers ignores packed position_ids
    if _takes_logit_mask(model):
        # Only those go through the LM head: in SFT most positions are prompt, and the head (vocab x hidden)
        # is the largest matmul of a small LM. Same loss, a fraction of the head's compute and logits memory.
        logits = model(**inputs, logits_to_keep=keep).logits.float()  # (targets in the batch, vocab)
    else:
        logits = model(**inputs).logits.float()[keep]
    return logits, targets[is_target], keep.nonzero()[:, 0]


def _per_row(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, row, values)


def loss_sum(model, batch: dict, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-target losses per row, targets per row): the caller decides what to normalize by."""
    labels = batch["labels"]
    if task == "causal_lm":
        logits, targets, row = target_logits(model, batch)
        losses = F.cross_entropy(logits, targets, reduction="none")
        return _per_row(losses, row, len(labels)), (labels[:, 1:] != -100).sum(1)
    logits = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits.float()
    if logits.shape[-1] == 1:  # regression head (STS-B)
        return (logits.squeeze(-1) - labels.float()) ** 2, torch.ones_like(labels, dtype=torch.long)
    return F.cross_entropy(logits, labels, reduction="none"), torch.ones_like(labels)


def _takes_logit_mask(model) -> bool:
    """Does this causal LM accept a boolean logits_to_keep mask (transformers' own models do; remote code may not)?"""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's reply tokens, their count)."""
    nll, n = loss_sum(model, batch, "causal_lm")
    return -nll, n.to(nll.dtype)


@contextlib.contextmanager
def as_reference(model, accelerator):
    """Within the block, `model` computes the reference: eval mode (no dropout), under no_grad, with the adapter off
    or, where lora.init_from loaded one, the frozen "ref" adapter active."""
    peft_model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if REF_ADAPTER in getattr(peft_model, "peft_config", {}):
                peft_model.set_adapter(REF_ADAPTER)  # peft marks the active adapter trainable: undone below
                try:
                    yield
                finally:
                    peft_model.set_adapter("default")
                    for name, p in peft_model.named_parameters():
                        if f".{REF_ADAPTER}." in name:
                            p.requires_grad_(False)
            else:
                with peft_model.disable_adapter():
                    yield
    finally:
        model.train(was_training)


def reference_logps(model, batch: dict, accelerator) -> torch.Tensor:
    """The batch's precomputed reference log-probabilities (objective.precompute_ref), or a reference forward now."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(torch.float32)
    with as_reference(model, accelerator):
        return sequence_logps(model, batch)[0]


# ---- the objectives the loop calls ----

@dataclass
class Objective:
    units: Callable  # micro-batch -> how many units its loss is a sum over (a 0-d tensor)
    # (model, micro-batch) -> (per-unit losses, {name: tensor [sum, count]}): the loop logs each stat as
    # train/NAME, the sum over the step's micro-batches and processes over the count
    loss: Callable
    evaluate: Callable  # (model, eval batches, step) -> metrics
    reference: bool = False  # needs reference log-probabilities (precompute_ref can compute them once)
    # RL (lorafit/grpo.py): (model, prompt micro-batch, its index in the run) -> the micro-batch to train on, made
    # once per `iterations` optimizer steps
    rollout: Callable | None = None
    iterations: int = 1


def build(cfg, accelerator) -> Objective:
    name, task = cfg.objective.name, cfg.model.task
    if name == "sft":
        return Objective(units=lambda b: _target_count(b, task), loss=lambda model, b: (loss_sum(model, b, task)[0], {}),
                         evaluate=lambda model, batches, step: evaluate(model, batches, cfg, accelerator))
    o = cfg.objective
    if name == "kto":
        return Objective(units=lambda b: torch.tensor(len(b["labels"])),
                         loss=lambda model, b: _kto_loss(model, b, o, accelerator),
                         evaluate=lambda model, batches, step: _evaluate_kto(model, batches, o, accelerator), reference=True)
    fn = PAIR_LOSSES[name]
    return Objective(units=lambda b: torch.tensor(len(b["labels"]) // 2),
                     loss=lambda model, b: _pair_loss(model, b, fn, o, accelerator),
                     evaluate=lambda model, batches, step: _evaluate_pairs(model, batches, fn, o, accelerator),
                     reference=name not in REFERENCE_FREE)


def _target_count(batch, task) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum() if task == "causal_lm" else torch.tensor(len(batch["labels"]))


def _pair_losses(fn, pol, ref, n, o):
    """(losses, chosen rewards, rejected rewards) of a pair batch's rows: the B chosen ones, then the B rejected."""
    b = len(pol) // 2
    losses, chosen, rejected = fn(pol[:b], pol[b:], ref[:b], ref[b:], n[:b], n[b:], o)
    if o.sft_weight:  # LLaMA-Factory's pref_ftx: the chosen reply's NLL per token, weighted
        losses = losses + o.sft_weight * (-pol[:b] / n[:b])
    return losses, chosen, rejected


def _pair_loss(model, batch, fn, o, accelerator):
    pol, n = sequence_logps(model, batch)  # chosen and rejected in one forward
    # SimPO and ORPO never read the reference: no forward for it
    ref = torch.zeros_like(pol) if o.name in REFERENCE_FREE else reference_logps(model, batch, accelerator)
    losses, chosen, rejected = _pair_losses(fn, pol, ref, n, o)
    margins = (chosen - rejected).detach()
    return losses, {"reward_margin": torch.stack([margins.sum(), torch.tensor(float(len(margins)), device=margins.device)])}


def _kto_loss(model, batch, o, accelerator):
    pol, _ = sequence_logps(model, batch)
    ref = reference_logps(model, batch, accelerator)
    losses, _ = kto(pol, ref, batch["kto_label"].bool(), o, kto_reference_point(pol, ref, accelerator))
    return losses, {}


def _scored(model, batch, accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation's forwards: (policy log-probabilities, reference log-probabilities, token counts, per row) and the
    per-row sum over reply tokens of KL(policy ‖ reference) between the two next-token distributions: an exact KL
    over the vocabulary at each position (≥ 0), not a log-ratio of the observed tokens. The reference runs live
    here even with precompute_ref, which saves training forwards."""
    logits, targets, row = target_logits(model, batch)
    with as_reference(model, accelerator):
        ref_logits = target_logits(model, batch)[0]
    logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    pick = lambda lp: _per_row(lp.gather(1, targets[:, None])[:, 0], row, len(batch["labels"]))
    kl = _per_row((logp.exp() * (logp - ref_logp)).sum(-1), row, len(batch["labels"]))
    n = (batch["labels"][:, 1:] != -100).sum(1).to(logits.dtype)
    return pick(logp), pick(ref_logp), n, kl


@torch.no_grad()
def _evaluate_pairs(model, batches, fn, o, accelerator) -> dict:
    """Reward accuracy and margin, the replies' log-probabilities (summed per reply, averaged over pairs), and the
    policy's KL to the reference per token of the chosen replies (eval/kl), over every held-out pair once."""
    model.eval()
    rows = []
    for batch in batches:
        pol, ref, n, kl = _scored(model, batch, accelerator)
        b = len(pol) // 2
        losses, chosen, rejected = _pair_losses(fn, pol, ref, n, o)
        out = torch.stack([losses, chosen, rejected, pol[:b], pol[b:], kl[:b], n[:b]], 1).double()
        rows.append(accelerator.gather_for_metrics(out).cpu())
    r = torch.cat(rows)
    loss, chosen, rejected, pol_c, pol_r, kl, n_c = r.T
    return {"reward_accuracy": float((chosen > rejected).double().mean()), "reward_margin": float((chosen - rejected).mean()),
            "loss": float(loss.mean()), "chosen_logp": float(pol_c.mean()), "rejected_logp": float(pol_r.mean()),
            "kl": float(kl.sum() / n_c.sum()), "n": len(r)}


@torch.no_grad()
def _evaluate_kto(model, batches, o, accelerator) -> dict:
    """KTO's rows are unpaired: reward accuracy is the share of rows whose reward has its label's sign (desirable
    above 0, undesirable below), the margin the mean desirable reward minus the mean undesirable one."""
    model.eval()
    rows = []
    for batch in batches:
        pol, ref, n, kl = _scored(model, batch, accelerator)
        desirable = batch["kto_label"].bool()
        losses, reward = kto(pol, ref, desirable, o, kto_reference_point(pol, ref, accelerator))
        rows.append(accelerator.gather_for_metrics(torch.stack([losses, reward, desirable.to(pol.dtype), pol, kl, n], 1).double()).cpu())
    loss, reward, desirable, pol, kl, n = torch.cat(rows).T
    good, bad = desirable.bool(), ~desirable.bool()  # a side with no rows gives nan (the mean of nothing)
    return {"reward_accuracy": float(((reward > 0) == good).double().mean()),
            "reward_margin": float(reward[good].mean() - reward[bad].mean()), "loss": float(loss.mean()),
            "chosen_logp": float(pol[good].mean()), "rejected_logp": float(pol[bad].mean()),
            "kl": float(kl[good].sum() / n[good].sum()), "n": len(pol)}


@torch.no_grad()
def precompute_reference(model, ds, pad_id: int, batch_size: int, accelerator, desc: str):
    """objective.precompute_ref: `ds` with a `ref_logps` column (chosen and rejected for a pair row), computed once
    by the reference. Every process scores every row, so the column is the same everywhere without a gather."""
    from tqdm.auto import tqdm

    from lorafit.data import collate

    out = []
    for start in tqdm(range(0, len(ds), batch_size), desc=f"reference log-probs ({desc})",
                      disable=not accelerator.is_local_main_process, dynamic_ncols=True):
        rows = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        batch = {k: v.to(accelerator.device) for k, v in collate(rows, pad_id).items()}
        with as_reference(model, accelerator):
            logps = sequence_logps(model, batch)[0].cpu().tolist()
        b = len(rows)
        out += [[logps[i], logps[b + i]] for i in range(b)] if len(logps) == 2 * b else logps  # pairs: [chosen, rejected]
    return ds.add_column("ref_logps", out)


# ---- SFT and classification evaluation ----

EVAL_TARGETS = 1024  # causal-LM evaluation scores at most this many target tokens per forward (see _row_groups)


def _row_groups(batch: dict) -> list[dict]:
    """A causal-LM eval batch as groups of whole rows with at most EVAL_TARGETS targets each (one row at least).
    Scoring needs float logits for every target, (targets × vocab): 8 rows of 512 fully-scored tokens on SmolLM2's
    49k vocab raised a run's peak memory by 4.5 GB. A packed batch (one row) stays whole."""
    targets = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    groups, start, count = [], 0, 0
    for i, n in enumerate(targets):
        if i > start and count + n > EVAL_TARGETS:
            groups.append((start, i))
            start, count = i, 0
        count += n
    groups.append((start, len(targets)))
    return [{k: v[a:b] for k, v in batch.items()} for a, b in groups]


@torch.no_grad()
def evaluate(model, batches, cfg, accelerator) -> dict:
    """SFT and classification metrics over the eval split, gathered across processes with padding duplicates
    dropped."""
    model.eval()
    task, rows = cfg.model.task, []
    for batch in batches:
        if task == "causal_lm":
            out = torch.cat([torch.stack(loss_sum(model, part, task), 1) for part in _row_groups(batch)]).double()
        else:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            pred = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1).float()
            out = torch.stack([pred, batch["labels"].float()], 1).double()
        rows.append(accelerator.gather_for_metrics(out).cpu())
    res = torch.cat(rows).numpy()
    if task == "causal_lm":
        out = metrics.language_model(float(res[:, 0].sum()), int(res[:, 1].sum()))
    elif metrics.problem_type(cfg) == "regression":
        out = metrics.regression(res[:, 0], res[:, 1])
    else:
        out = metrics.classification(res[:, 0].astype(int), res[:, 1].astype(int), cfg.data.task)
    return {**out, "n": len(res)}  # rows evaluated: each exactly once, however many processes
