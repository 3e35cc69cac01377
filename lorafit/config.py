"""The typed config schema, registered in Hydra's ConfigStore, and the validation that lists every problem at once.

Hydra composes conf/config.yaml (groups: model, data, lora, quant, train, hooks, logging, then a recipe),
then the command-line overrides, on top of `Config` below, so a wrongly typed value (`lora.r=abc`) is
rejected by OmegaConf with its full key before any of our code runs. `validate()` then checks the values
against each other and against the model's own module names, and reports every problem in one error.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from lorafit.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

MERGE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype / hooks.merge.dtype

# The closed choices, as enums: OmegaConf rejects any other value at compose time, naming the key and the allowed
# values. Members are str (StrEnum), so `cfg.model.task == "seq_cls"` and dict lookups work as with plain strings.
Task = StrEnum("Task", ["seq_cls", "causal_lm"])
DataSource = StrEnum("DataSource", ["bbc_news", "glue", "files", "sft", "preference", "prompts"])
MixStrategy = StrEnum("MixStrategy", ["over", "under"])
ProblemType = StrEnum("ProblemType", ["classification", "regression"])
SftFormat = StrEnum("SftFormat", ["auto", "messages", "sharegpt", "alpaca", "prompt_response"])
QuantMode = StrEnum("QuantMode", ["none", "int8", "nf4"])
FloatDtype = StrEnum("FloatDtype", list(MERGE_DTYPES.values()))
Method = StrEnum("Method", ["lora", "full"])
LoraInit = StrEnum("LoraInit", ["gaussian", "default", "pissa", "olora"])
Optimizer = StrEnum("Optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
Scheduler = StrEnum("Scheduler", ["linear", "cosine", "constant", "constant_with_warmup"])
AutoMoments = StrEnum("AutoMoments", ["project", "reset"])
Precision = StrEnum("Precision", ["auto", "no", "bf16", "fp16"])
OnNonfinite = StrEnum("OnNonfinite", ["stop", "skip"])
Tracker = StrEnum("Tracker", ["none", "wandb", "tensorboard"])
MergeDtype = StrEnum("MergeDtype", list(MERGE_DTYPES))
ObjectiveName = StrEnum("ObjectiveName", ["sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"])
GrpoLoss = StrEnum("GrpoLoss", ["grpo", "dapo", "dr_grpo"])  # lorafit.grpo.LOSS_TYPES
RewardScale = StrEnum("RewardScale", ["group", "none"])
GgufType = StrEnum("GgufType", ["f16", "q8_0"])  # lorafit.export.GGUF_TYPES


@dataclass
class ModelConfig:
    name: str = "minilm-l6"  # a packaged alias (minilm-l6, smollm2-135m), a tiny test model, a local dir or a hub id
    task: Task = Task.seq_cls
    dtype: FloatDtype = FloatDtype.float32  # dtype of the (unquantized) base weights
    trust_remote_code: bool = False  # off unless asked: hub code runs with the user's rights
    revision: Optional[str] = None
    gradient_checkpointing: bool = False
    dropout: Optional[float] = None  # override the checkpoint's own dropout probabilities (None keeps them)
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2 ...; None: transformers' default
    fast_dropout: bool = True  # CPU dropout masks from cheap 16-bit draws (lorafit/speed.py); false: torch's own


@dataclass
class MixSource:
    """One entry of data.mix: a local file or a hub dataset, and its sampling weight."""
    train_file: Optional[str] = None
    hf_dataset: Optional[str] = None
    hf_subset: Optional[str] = None
    hf_split: str = "train"
    weight: float = 1.0


@dataclass
class DataConfig:
    source: DataSource = DataSource.bbc_news
    task: Optional[str] = None  # GLUE task name with source=glue (mnli, sst2, ...)
    train_file: Optional[str] = None  # csv / jsonl / parquet for source=files|sft
    format: SftFormat = SftFormat.auto  # source=sft: row format; auto detects it from the columns
    eval_file: Optional[str] = None  # None: hold out data.eval_fraction of train_file (stratified by label)
    eval_fraction: float = 0.1
    hf_dataset: Optional[str] = None  # source=files|sft: a hub dataset (or local dataset dir) instead of train_file
    hf_subset: Optional[str] = None
    hf_split: str = "train"
    hf_eval_split: Optional[str] = None  # None: data.eval_file, or else hold out data.eval_fraction
    mix: List[MixSource] = field(default_factory=list)  # several train sources, interleaved by weight
    mix_strategy: MixStrategy = MixStrategy.over  # over: until every source is used up (small ones repeat); under: until the first is
    text_columns: List[str] = field(default_factory=lambda: ["text"])  # one column, or two for sentence pairs
    label_column: str = "label"
    problem_type: Optional[ProblemType] = None  # data=files seq_cls; None: classes (float labels are refused until set)
    max_length: int = 128
    eval_size: int = 500  # held-out articles for bbc_news (a fixed split, independent of train.seed)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    group_by_length: bool = False  # batch rows of similar length (less padding; exact: nothing crosses rows)
    packing: bool = False  # causal LM: a micro-batch's rows back to back in one row, no padding (exact: see collate)
    # data=prompts | bbc_news with objective=grpo: a row's prompt from its columns, a str.format template
    # ("Topic of: {text:.600}" cuts the text at 600 characters); null: the row's prompt or messages column
    prompt_template: Optional[str] = None
    # prompt rows (objective=grpo): false gives the model the prompt as plain text, no chat template: for a base
    # model, or a few-shot prompt that the model is to continue ("...\nTopic:")
    chat_template: bool = True


@dataclass
class LoraConfig:
    method: Method = Method.lora  # full (every parameter trains: the baseline a rank sweep is read against)
    r: Any = 8  # a positive integer, or auto: train at r_max, shrink each module inside the run (lorafit/autorank.py)
    r_max: int = 32  # r=auto: the rank trained at until the shrink; the scale alpha / r_max is kept after it
    auto_energy: float = 0.9  # r=auto: each module keeps the smallest rank holding this share of its ΔW's energy
    auto_shrink_at: float = 0.5  # r=auto: the shrink's place, as a share of the run's steps (0.5 beat 0.25: RESULTS.md)
    auto_moments: AutoMoments = AutoMoments.project  # r=auto: Adam's moments at the shrink: project (onto the kept ranks) | reset
    auto_warmup: int = 10  # r=auto with auto_moments=reset: steps of learning-rate warm-up after the shrink
    alpha: float = 16.0
    dropout: float = 0.0  # 0 by default: dropout costs ~45% of a CPU step on MiniLM and did not help accuracy here
    target_modules: Any = field(default_factory=lambda: ["query", "value"])  # list of names, a regex, or "all-linear"
    modules_to_save: Optional[List[str]] = None  # seq_cls adds the classifier head automatically
    use_rslora: bool = False
    use_dora: bool = False
    init: LoraInit = LoraInit.gaussian
    lr_ratio: Optional[float] = None  # LoRA+: lr of B = lr_ratio * lr of A
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    # MoE experts: transformers 5 keeps each layer's experts as one 3-D tensor, which target_modules cannot reach.
    # peft's target_parameters can, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]; all-linear on an MoE
    # adds them itself (peft). The run checks that each targeted tensor holds an adapter for every expert.
    target_parameters: Optional[List[str]] = None
    # each expert's rank in those tensors (default lora.r, as peft). A budget such as max(1, r // num_experts) keeps
    # all experts together at one dense layer's size. The fused gate_up_proj gets 2 * r_expert, as peft's all-linear
    # gives it 2r; the scale alpha / r is kept.
    r_expert: Optional[int] = None
    # Start from a trained adapter (a lorafit run dir or any PEFT adapter dir): its rank, alpha and targets replace
    # the keys above. A preference objective's reference is then that adapter, frozen (SFT -> DPO).
    init_from: Optional[str] = None


@dataclass
class ObjectiveConfig:
    """What the loop minimizes (lorafit/objectives.py). sft: next-token loss on the replies (or the task's loss);
    dpo | ipo | simpo | orpo on preference pairs (data=preference); kto on rows labelled desirable or not."""
    name: ObjectiveName = ObjectiveName.sft
    beta: float = 0.1  # DPO/IPO/KTO: strength of the pull to the reference; SimPO: reward scale; ORPO: odds-ratio weight
    label_smoothing: float = 0.0  # DPO / SimPO: the share of pairs assumed mislabelled (cDPO)
    gamma: float = 0.5  # SimPO: the target reward margin
    sft_weight: float = 0.0  # DPO / IPO / SimPO: plus this times the chosen reply's NLL per token (LLaMA-Factory's pref_ftx)
    precompute_ref: bool = False  # reference log-probabilities once before training, not one forward per step
    desirable_weight: float = 1.0  # KTO: weight of desirable rows' losses
    undesirable_weight: float = 1.0  # KTO: weight of undesirable rows' losses
    # GRPO (lorafit/grpo.py; data=prompts). beta is the KL weight there: 0 (its default) runs no reference at all
    rewards: List[Any] = field(default_factory=list)  # [{_target_: lorafit.rewards.exact_match, weight: 1.0, ...}]
    num_generations: int = 8  # G: completions sampled per prompt, the group its advantages are normalized in
    max_new_tokens: int = 64  # per completion
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: GrpoLoss = GrpoLoss.dapo  # grpo: mean per completion; dapo: per token; dr_grpo: per token over G x max_new_tokens
    epsilon: float = 0.2  # the ratio's clip range [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # null: epsilon (DAPO's clip-higher uses 0.28)
    scale_rewards: RewardScale = RewardScale.group  # group: advantages over the group's std; none: not scaled (Dr. GRPO)
    mask_truncated: bool = False  # completions cut at max_new_tokens carry no loss (DAPO's overlong filtering)
    kl_correction: bool = True  # the KL term times ρ (DeepSeek-V3.2; TRL's use_bias_correction_kl): unbiased gradient
    iterations: int = 1  # μ: optimizer steps per rollout (> 1: clipped off-policy updates on the same completions)


@dataclass
class QuantConfig:
    mode: QuantMode = QuantMode.none  # int8 | nf4 (QLoRA), through bitsandbytes
    compute_dtype: FloatDtype = FloatDtype.bfloat16
    double_quant: bool = True
    quant_storage: Optional[str] = None  # e.g. bfloat16 for FSDP + QLoRA


@dataclass
class TrainConfig:
    batch_size: int = 16  # per device
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    scheduler: Scheduler = Scheduler.linear
    optimizer: Optimizer = Optimizer.adamw
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: Precision = Precision.auto  # auto = bf16 where the GPU or CPU has it natively, else fp32
    eval_every: int = 0  # 0 = only at the end
    eval_on_start: bool = False  # also evaluate before the first step (step 0): the base line the run is read against
    save_best: bool = False  # the final adapter is the best evaluation's (primary metric), not the last step's
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    save_every: int = 0  # 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 42
    resume: Optional[str] = None  # auto | PATH to a checkpoint dir
    overwrite: bool = False  # a run dir that holds a run: clear lorafit's files of it and start over (else refused)
    on_nonfinite: OnNonfinite = OnNonfinite.stop  # what a NaN/inf loss does


@dataclass
class EvalConfig:
    generate: int = 0  # causal-LM SFT: generate replies for the first N eval rows at every evaluation; 0 = off
    max_new_tokens: int = 64  # per generated reply (greedy)
    forgetting_file: Optional[str] = None  # causal LM: general text (.txt, or a file with a `text` column, or bbc_news)
    forgetting_rows: int = 64  # its first N paragraphs / rows, each cut at data.max_length tokens


@dataclass
class SaveAdapterHook:
    dir: str = "adapter"


@dataclass
class SpectrumHook:
    energy: float = 0.9  # energy target of the rank advisor
    plots: bool = True  # PNGs in analysis/ (and on the W&B / TensorBoard run)
    intruders: bool = True  # intruder dimensions of W0 + ΔW (two SVDs per module; false skips them)


@dataclass
class MergeHook:
    dir: str = "merged"
    dtype: MergeDtype = MergeDtype.fp32
    gguf: Optional[GgufType] = None  # also write merged/model-TYPE.gguf for llama.cpp / Ollama (Llama models)


@dataclass
class HooksConfig:
    # A hook runs when its entry is set; they run in this order. Select with hooks=[save_adapter,spectrum,merge].
    save_adapter: Optional[SaveAdapterHook] = None
    spectrum: Optional[SpectrumHook] = None
    merge: Optional[MergeHook] = None


@dataclass
class LoggingConfig:
    backend: Tracker = Tracker.none
    project: str = "lorafit"
    run_name: Optional[str] = None
    group: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


ConfigStore.instance().store(name="lorafit_schema", node=Config)


def _objective_problems(cfg) -> list[str]:
    """The objective's keys, and whether it fits the model, the data and the adapter."""
    o, d, lo, errors = cfg.objective, cfg.data, cfg.lora, []
    if o.name == "sft":
        if d.source == "preference":
            errors.append("data=preference holds pairs for a preference objective: set objective=dpo (or ipo, simpo, "
                          "orpo, kto); for SFT on the chosen replies, give them as data=sft rows")
        if d.source == "prompts":
            errors.append("data=prompts holds prompts without replies, for objective=grpo; for SFT give prompt and "
                          "reply rows as data=sft")
    elif o.name == "grpo":
        errors += _grpo_problems(cfg)
    if o.name != "grpo" and not d.chat_template:
        errors.append(f"data.chat_template=false applies to prompt rows (objective=grpo); objective={o.name} renders "
                      "its rows through the model's chat template where it has one: leave data.chat_template=true")
    if o.name not in ("sft", "grpo"):
        if cfg.model.task != "causal_lm":
            errors.append(f"objective={o.name} tunes a causal LM on replies; model.task is {cfg.model.task}: use "
                          "objective=sft for a classifier")
        if d.source != "preference":
            errors.append(f"objective={o.name} reads preference rows (prompt, chosen, rejected; or prompt, completion, "
                          f"label for KTO): set data=preference (data.source is {d.source})")
        if d.packing:
            errors.append(f"data.packing=true packs SFT rows; objective={o.name} scores whole replies: set data.packing=false")
    if o.beta < 0 or (o.beta == 0 and o.name != "grpo"):
        errors.append(f"objective.beta={o.beta} must be > 0" + (" (0 turns the KL term off for grpo only)" if o.beta == 0 else ""))
    if not 0 <= o.label_smoothing < 0.5:
        errors.append(f"objective.label_smoothing={o.label_smoothing} must be in [0, 0.5)")
    elif o.label_smoothing and o.name not in ("dpo", "simpo"):
        errors.append(f"objective.label_smoothing={o.label_smoothing} applies to dpo and simpo, not {o.name}: set it to 0")
    if o.gamma < 0:
        errors.append(f"objective.gamma={o.gamma} must be >= 0")
    if o.sft_weight < 0:
        errors.append(f"objective.sft_weight={o.sft_weight} must be >= 0")
    elif o.sft_weight and o.name not in ("dpo", "ipo", "simpo"):
        errors.append(f"objective.sft_weight={o.sft_weight} applies to dpo, ipo and simpo (orpo has its NLL term "
                      f"built in), not {o.name}: set it to 0")
    if o.desirable_weight <= 0 or o.undesirable_weight <= 0:
        errors.append(f"objective.desirable_weight={o.desirable_weight} and objective.undesirable_weight="
                      f"{o.undesirable_weight} must be > 0")
    if lo.init_from is not None:
        if lo.method != "lora" or lo.r == "auto":
            errors.append(f"lora.init_from continues a LoRA adapter: it needs lora.method=lora and an integer lora.r "
                          f"(its own rank is used), not method={lo.method}, r={lo.r}")
        else:
            from lorafit.adapters import init_from_dir

            try:
                init_from_dir(lo.init_from)
            except UserError as e:
                errors.append(str(e))
    return errors


def _grpo_problems(cfg) -> list[str]:
    o, d, errors = cfg.objective, cfg.data, []
    if cfg.model.task != "causal_lm":
        errors.append(f"objective=grpo samples replies from a causal LM; model.task is {cfg.model.task}")
    if d.source not in ("prompts", "bbc_news"):
        errors.append(f"objective=grpo reads prompt rows (a prompt or messages column, or data.prompt_template, plus "
                      f"the columns its rewards read): set data=prompts (data.source is {d.source})")
    elif d.source == "bbc_news" and not d.prompt_template:
        errors.append("objective=grpo on data=bbc_news makes each article's prompt from data.prompt_template (e.g. "
                      "'Topic of this article in one word: {text:.600}'): set it, or use recipe=grpo_topic")
    if d.packing:
        errors.append("data.packing=true packs SFT rows; objective=grpo generates per prompt: set data.packing=false")
    if not o.rewards:
        errors.append("objective=grpo needs objective.rewards, e.g. [{_target_: lorafit.rewards.exact_match, column: "
                      "answer, weight: 1.0}]")
    else:
        from lorafit.rewards import build

        try:
            build(o.rewards)
        except UserError as e:
            errors.append(str(e))
    if o.num_generations < 2:
        errors.append(f"objective.num_generations={o.num_generations} must be >= 2: advantages compare a prompt's "
                      "completions with each other")
    for key in ("max_new_tokens", "iterations"):
        if o[key] <= 0:
            errors.append(f"objective.{key}={o[key]} must be a positive integer")
    if o.temperature <= 0:
        errors.append(f"objective.temperature={o.temperature} must be > 0 (GRPO samples; eval is greedy)")
    if not 0 < o.top_p <= 1:
        errors.append(f"objective.top_p={o.top_p} must be in (0, 1]")
    if not 0 < o.epsilon < 1 or (o.epsilon_high is not None and o.epsilon_high <= 0):
        errors.append(f"objective.epsilon={o.epsilon} must be in (0, 1) and objective.epsilon_high={o.epsilon_high} "
                      "> 0 (or null: epsilon)")
    if o.precompute_ref:
        errors.append("objective.precompute_ref=true stores reference log-probs of fixed replies; GRPO's replies are "
                      "sampled each step: set it to false")
    if cfg.eval.generate:
        errors.append(f"eval.generate={cfg.eval.generate}: objective=grpo's evaluation generates for every held-out "
                      "prompt already (generations.jsonl); set eval.generate=0")
    return errors


def validate(cfg) -> None:
    """Check the composed config; raise one UserError listing every problem found."""
    errors: list[str] = []
    m, d, lo, q, t = cfg.model, cfg.data, cfg.lora, cfg.quant, cfg.train
    if lo.method == "full" and q.mode != "none":
        errors.append(f"lora=full trains every weight and can't run on quant.mode={q.mode} (4-/8-bit weights are frozen)")
    if cfg.hooks.spectrum is not None and not 0 < cfg.hooks.spectrum.energy <= 1:
        errors.append(f"hooks.spectrum.energy={cfg.hooks.spectrum.energy} must be in (0, 1]")

    r_ok = lo.r == "auto" or (isinstance(lo.r, int) and not isinstance(lo.r, bool) and lo.r > 0)
    if not r_ok:
        errors.append(f"lora.r={lo.r} must be a positive integer or auto")
    if lo.r == "auto":
        if lo.r_max <= 0 or not 0 < lo.auto_energy <= 1 or not 0 < lo.auto_shrink_at < 1 or lo.auto_warmup < 0:
            errors.append(f"lora.r=auto needs lora.r_max > 0 (is {lo.r_max}), lora.auto_energy in (0, 1] (is "
                          f"{lo.auto_energy}), lora.auto_shrink_at in (0, 1) (is {lo.auto_shrink_at}) and "
                          f"lora.auto_warmup >= 0 (is {lo.auto_warmup})")
        if lo.rank_pattern or lo.alpha_pattern or lo.method != "lora":
            errors.append("lora.r=auto chooses lora.rank_pattern / alpha_pattern itself (LoRA only): leave them empty")
        if lo.use_dora or lo.init in ("pissa", "olora") or cfg.train.optimizer != "adamw":
            errors.append(f"lora.r=auto truncates plain LoRA factors and maps AdamW's moments: it needs lora.use_dora="
                          f"false (is {lo.use_dora}), lora.init gaussian or default (is {lo.init}) and train.optimizer="
                          f"adamw (is {cfg.train.optimizer})")
    if lo.alpha <= 0:
        errors.append(f"lora.alpha={lo.alpha} must be > 0")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout={lo.dropout} must be in [0, 1)")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        errors.append(f"model.dropout={m.dropout} must be in [0, 1) (or null to keep the checkpoint's)")
    if lo.lr_ratio is not None and lo.lr_ratio <= 0:
        errors.append(f"lora.lr_ratio={lo.lr_ratio} must be > 0 (or null to turn LoRA+ off)")
    if lo.r_expert is not None and (isinstance(lo.r_expert, bool) or not isinstance(lo.r_expert, int) or lo.r_expert <= 0
                                    or lo.r == "auto"):
        errors.append(f"lora.r_expert={lo.r_expert} must be a positive integer, with an integer lora.r (is {lo.r})")
    for k, v in (lo.rank_pattern or {}).items():
        if v <= 0:
            errors.append(f"lora.rank_pattern.{k}={v} must be a positive integer")
    tm = lo.target_modules
    if not (isinstance(tm, str) or (hasattr(tm, "__len__") and len(tm) > 0 and all(isinstance(x, str) for x in tm))):
        errors.append(f"lora.target_modules={tm!r} must be a list of module names, a regex string, or 'all-linear'")
    elif isinstance(tm, str) and tm != "all-linear":
        try:
            re.compile(tm)
        except re.error as e:
            errors.append(f"lora.target_modules={tm!r} is not a valid regex: {e}")

    for key in ("batch_size", "eval_batch_size", "grad_accum", "keep_checkpoints", "log_every"):
        if getattr(t, key) <= 0:
            errors.append(f"train.{key}={getattr(t, key)} must be a positive integer")
    if t.lr <= 0:
        errors.append(f"train.lr={t.lr} must be > 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        errors.append("train.max_steps and train.epochs are both <= 0: set one of them (e.g. train.max_steps=100)")
    if not 0 <= t.warmup_ratio < 1:
        errors.append(f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.max_grad_norm < 0:
        errors.append(f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 turns clipping off)")
    if t.early_stopping_patience < 0:
        errors.append(f"train.early_stopping_patience={t.early_stopping_patience} must be >= 0 (0 turns it off)")
    if (t.early_stopping_patience or t.save_best) and t.eval_every == 0:
        errors.append("train.save_best / train.early_stopping_patience compare evaluations: set train.eval_every=N")
    for key in ("eval_every", "save_every"):
        if getattr(t, key) < 0:
            errors.append(f"train.{key}={getattr(t, key)} must be >= 0 (0 turns it off)")
    if t.overwrite and t.resume is not None:
        errors.append(f"train.overwrite=true starts over and train.resume={t.resume} continues: set one of them")
    if t.resume not in (None, "auto") and not Path(t.resume).is_dir():
        errors.append(f"train.resume={t.resume!r}: no such checkpoint dir (use 'auto' or a checkpoints/step_N path)")

    if cfg.eval.generate < 0 or cfg.eval.max_new_tokens <= 0:
        errors.append(f"eval.generate={cfg.eval.generate} must be >= 0 and eval.max_new_tokens="
                      f"{cfg.eval.max_new_tokens} > 0")
    if cfg.eval.forgetting_file is not None:
        f = cfg.eval.forgetting_file
        if m.task != "causal_lm":
            errors.append(f"eval.forgetting_file measures a causal LM's loss on general text; model.task is {m.task}")
        if f != "bbc_news" and not Path(f).is_file():
            errors.append(f"eval.forgetting_file={f!r}: file not found (a .txt, .jsonl/.csv/.parquet with a 'text' "
                          "column, or bbc_news)")
        if cfg.eval.forgetting_rows <= 0:
            errors.append(f"eval.forgetting_rows={cfg.eval.forgetting_rows} must be > 0")
    if cfg.eval.generate and d.source not in ("sft", "preference"):
        errors.append(f"eval.generate={cfg.eval.generate} scores replies against the reference ones of SFT data: "
                      f"it needs data=sft or data=preference (data.source is {d.source}); set eval.generate=0")
    errors += _objective_problems(cfg)

    if d.max_length < 8:
        errors.append(f"data.max_length={d.max_length} must be >= 8")
    if d.source == "glue":
        from lorafit.data import GLUE_TASKS

        if d.task not in GLUE_TASKS:
            errors.append(f"data.task={d.task!r} is not one of: {', '.join(GLUE_TASKS)}")
    if d.source in ("files", "sft", "preference", "prompts"):
        given = [k for k in ("train_file", "hf_dataset", "mix") if d[k]]
        if len(given) != 1:
            errors.append(f"data.source={d.source} reads one of data.train_file, data.hf_dataset or data.mix"
                          + (f"; {' and '.join('data.' + k for k in given)} are all set" if given else ": set one"))
        files = [("data.train_file", d.train_file), ("data.eval_file", d.eval_file)]
        for i, src in enumerate(d.mix):
            files.append((f"data.mix[{i}].train_file", src.train_file))
            if (src.train_file is None) == (src.hf_dataset is None):
                errors.append(f"data.mix[{i}] needs one of train_file or hf_dataset")
            if src.weight <= 0:
                errors.append(f"data.mix[{i}].weight={src.weight} must be > 0")
        for key, path in files:
            if path is None:
                continue
            if not Path(path).is_file():
                errors.append(f"{key}={path!r}: file not found")
            elif Path(path).suffix.lower() not in (".csv", ".json", ".jsonl", ".parquet"):
                errors.append(f"{key}={path!r}: unsupported extension (use .csv, .jsonl, .json or .parquet)")
    if not 0 < d.eval_fraction < 1:
        errors.append(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
    if d.source == "files" and not 1 <= len(d.text_columns) <= 2:
        errors.append(f"data.text_columns={list(d.text_columns)} must name one column, or two for sentence pairs")
    if d.source in ("sft", "preference", "prompts") and m.task != "causal_lm":
        errors.append(f"data.source={d.source} needs model.task=causal_lm")
    if d.packing and m.task != "causal_lm":
        errors.append(f"data.packing=true needs model.task=causal_lm (it is {m.task}); set data.packing=false")
    if d.source == "glue" and m.task != "seq_cls":
        errors.append("data.source=glue needs model.task=seq_cls")
    if d.problem_type is not None and (d.source != "files" or m.task != "seq_cls"):
        errors.append(f"data.problem_type={d.problem_type} is for data=files with model.task=seq_cls; unset it")

    if q.mode != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            errors.append(f"quant.mode={q.mode} needs bitsandbytes: pip install bitsandbytes (or set quant=none)")
        if lo.init in ("pissa", "olora"):
            errors.append(f"lora.init={lo.init} needs a float base and can't run on quant.mode={q.mode}")
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and q.quant_storage is None:
            errors.append(f"quant.mode={q.mode} under FSDP needs quant.quant_storage=bfloat16 (FSDP flattens the "
                          "4-bit weights together with the bf16 ones)")
    if t.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        errors.append(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install bitsandbytes")
    if cfg.logging.backend == "wandb" and importlib.util.find_spec("wandb") is None:
        errors.append("logging.backend=wandb needs wandb: pip install wandb")

    if cfg.hooks.merge is not None and cfg.hooks.merge.gguf is not None:
        from lorafit.export import GGUF_FAMILIES
        from lorafit.models import load_config

        kind = load_config(m).model_type
        if m.task != "causal_lm" or kind not in GGUF_FAMILIES:
            errors.append(f"hooks.merge.gguf={cfg.hooks.merge.gguf} exports {', '.join(GGUF_FAMILIES)} causal LMs; "
                          f"{m.name} ({kind}, {m.task}) is not one: set hooks.merge.gguf=null")
    if lo.method == "lora" and lo.init_from is None and (lo.r == "auto" or isinstance(lo.r, int)):  # checks against the model's own modules, built on the meta device (no weights loaded)
        from lorafit.adapters import check_targets

        from omegaconf import OmegaConf

        errors += check_targets(OmegaConf.merge(cfg, {"lora": {"r": lo.r_max}}), auto=True) if lo.r == "auto" \
            else check_targets(cfg)
    if errors:
        raise UserError("invalid config:\n  - " + "\n  - ".join(errors))
