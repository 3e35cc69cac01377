"""Attach LoRA to a base model through peft, and report what is trainable."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from lorafit.errors import UserError
from lorafit.models import HEAD_NAMES, linear_modules, meta_model, routed_experts

log = logging.getLogger(__name__)

PEFT_INIT = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}


def head_modules(model) -> list[str]:
    """A classifier's task head: its top-level modules with weights outside the pretrained body (`base_model`).
    That is `classifier` or `score`, and also DeBERTa's `pooler` or ModernBERT's `head`: a checkpoint saved without
    them (DeBERTa-v3's has no pooler) leaves them random, and left frozen they would stay random, and be drawn anew
    by every reload, so the merged and reloaded models would differ from the trained one."""
    body = model.base_model
    return [n for n, m in model.named_children() if m is not body and next(m.parameters(), None) is not None]


def peft_config(cfg, model=None):
    """`model`: the task model (or its meta skeleton) the config is for, whose head a classifier trains in full
    (causal LMs need none)."""
    from peft import LoraConfig, TaskType

    lo = cfg.lora
    target = lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules)
    to_save = list(lo.modules_to_save or []) + (head_modules(model) if model is not None and cfg.model.task == "seq_cls" else [])
    expert_ranks, expert_alphas = _expert_ranks(lo)
    return LoraConfig(
        r=lo.r_max if lo.r == "auto" else lo.r,  # auto trains at r_max until its shrink (autorank.py)
        lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=target,
        task_type=TaskType.SEQ_CLS if cfg.model.task == "seq_cls" else TaskType.CAUSAL_LM,
        modules_to_save=list(dict.fromkeys(to_save)) or None,
        use_rslora=lo.use_rslora, use_dora=lo.use_dora, init_lora_weights=PEFT_INIT[lo.init],
        rank_pattern={**(OmegaConf.to_container(lo.rank_pattern) if lo.rank_pattern else {}), **expert_ranks},
        alpha_pattern={**(OmegaConf.to_container(lo.alpha_pattern) if lo.alpha_pattern else {}), **expert_alphas},
        target_parameters=list(lo.target_parameters) if lo.target_parameters else None,
    )


# Patterns for lora.r_expert: peft matches each against a tensor's path (model.layers.0.mlp.experts.gate_up_proj)
# and takes the first that matches. The fused gate_up_proj (an expert's gate and up projections in one tensor) holds
# two projections; the other never matches it, since a saved adapter_config.json has its patterns sorted. The
# router (mlp.gate) is no expert and keeps lora.r. PEFT_FUSED is the pattern peft's all-linear adds itself (2r);
# ours sorts before it, so r_expert wins at training and at every reload alike.
EXPERT_FUSED, EXPERT_OTHER, PEFT_FUSED = r".*\.experts\.gate_up_proj", r".*\.experts\.(?!gate_up_proj$)[^.]+", r".*\.gate_up_proj"


def _expert_ranks(lo) -> tuple[dict, dict]:
    """rank_pattern and alpha_pattern entries for lora.r_expert; alpha follows the rank, so the scale stays alpha / r."""
    if lo.r_expert is None:
        return {}, {}
    ranks = {EXPERT_FUSED: 2 * lo.r_expert, EXPERT_OTHER: lo.r_expert}
    return ranks, {k: lo.alpha * v / lo.r for k, v in ranks.items()}


def _say_which_experts_train(model, cfg) -> None:
    if not routed_experts(model.config):
        return
    found = expert_adapters(model, cfg)
    if found:
        log.info("MoE: LoRA on %d expert tensors, e.g. %s", len(found), found[0])
    else:
        log.warning("MoE: no expert of %s has a LoRA adapter (lora.target_modules=%s reaches none of the 3-D expert "
                    "tensors): add lora.target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj] or use "
                    "all-linear", cfg.model.name, cfg.lora.target_modules)


def expert_adapters(model, cfg) -> list[str]:
    """Each MoE expert tensor that holds a LoRA adapter, as `path (E experts x rank r)`, after checking that its
    factors hold every expert at the rank asked; [] for a dense model. A rank that does not fit is an error, and so
    is lora.r_expert or target_parameters on a model whose experts got no adapter: a silent no-op on the experts
    (LoRA on attention only while the config says otherwise) is the failure this guards against."""
    from peft.tuners.lora import ParamWrapper
    from peft.utils.other import get_pattern_key

    experts = routed_experts(model.config)
    pc = model.peft_config["default"] if hasattr(model, "peft_config") else None
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, ParamWrapper) or "default" not in mod.lora_A:
            continue
        path = f"{name.split('.base_layer')[0].removeprefix('base_model.model.')}.{mod.parameter_name}"
        if mod.get_param().ndim != 3:  # the router, or a 2-D parameter
            continue
        want = pc.rank_pattern.get(get_pattern_key(pc.rank_pattern.keys(), path), pc.r)
        got = mod.lora_A["default"].weight.shape[0]
        if got != experts * want:
            raise UserError(f"{path}: peft gave its experts LoRA factors of {got} rows, not {experts} experts x rank "
                            f"{want}; this model's expert layout is not one lorafit has checked")
        found.append(f"{path} ({experts} experts x rank {want})")
    if not found and (cfg.lora.r_expert is not None or cfg.lora.target_parameters) and cfg.lora.method == "lora":
        raise UserError(f"lora.r_expert / lora.target_parameters are set, but no expert tensor of {cfg.model.name} "
                        "got an adapter: name its 3-D expert parameters (e.g. mlp.experts.gate_up_proj) in "
                        "lora.target_parameters")
    return found


def check_targets(cfg, auto: bool = False) -> list[str]:
    """Problems with lora.target_modules / lora.r, found by injecting the LoRA config with peft's own matching
    rules into a weightless meta-device skeleton of the model; the model's Linear names are listed. `auto`:
    lora.r=auto, checked at lora.r_max."""
    from dataclasses import replace

    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        skeleton = meta_model(cfg)
    except UserError as e:
        return [str(e)]
    linears = linear_modules(skeleton)
    names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears if not n.startswith(HEAD_NAMES)}))
    # PiSSA's SVD can't run on weightless tensors; dropout on expert tensors is peft's ValueError, checked below
    config = replace(peft_config(cfg, skeleton), init_lora_weights=False, lora_dropout=0.0)
    tm = cfg.lora.target_modules
    if not isinstance(tm, str):  # peft needs only one name of a list to match; each one should
        missing = [t for t in tm if not any(check_target_module_exists(replace(config, target_modules=[t]), n)
                                            for n in linears)]
        if missing:
            return [f"lora.target_modules: {', '.join(map(repr, missing))} match no Linear module of "
                    f"{cfg.model.name}; it has: {names}"]
    try:
        inject_adapter_in_model(config, skeleton)
    except ValueError:  # peft's NoMatchingPeftModuleError
        return [f"lora.target_modules={tm!r} matches no Linear module; this model has: {names}"]
    wrapped = [f"{n.split('.base_layer')[0]}.{m.parameter_name}" for n, m in skeleton.named_modules()
               if isinstance(m, ParamWrapper)]
    unmatched = [t for t in cfg.lora.target_parameters or [] if not any(w == t or w.endswith(f".{t}") for w in wrapped)]
    if unmatched:  # peft only warns when target_modules matched something
        tensors = sorted({n.split(".", 3)[-1] for n, p in skeleton.named_parameters() if p.ndim == 3})
        return [f"lora.target_parameters: {', '.join(map(repr, unmatched))} match no parameter of {cfg.model.name}; "
                f"its 3-D (expert) parameters: {', '.join(tensors) or 'none'}"]
    if wrapped and cfg.lora.dropout:
        return [f"lora.dropout={cfg.lora.dropout}: peft trains MoE expert tensors ({wrapped[0].split('.', 3)[-1]}, ...) "
                "without dropout; set lora.dropout=0, or leave the experts out of the targets"]
    if auto and wrapped:  # autorank's shrink is an SVD of one B·A; an expert tensor's factors hold one pair per expert
        return [f"lora.r=auto shrinks 2-D adapters, and lora.target_modules={tm!r} puts LoRA on {cfg.model.name}'s "
                f"MoE expert tensors ({wrapped[0].split('.', 3)[-1]}, ...): set an integer lora.r (and lora.r_expert), "
                "or leave the experts out of the targets"]
    # peft's all-linear lists a head's own Linears (RoBERTa's classifier.out_proj), but a head in modules_to_save
    # trains in full and gets no LoRA: its sizes do not bound lora.r
    heads = tuple(config.modules_to_save or ())
    matched = [n for n, mod in skeleton.named_modules() if isinstance(mod, LoraLayer) and n in linears
               and not n.startswith(heads)]
    too_small = sorted({f"{n.rsplit('.', 1)[-1]} (min dim {min(linears[n])})" for n in matched if cfg.lora.r > min(linears[n])})
    if cfg.lora.r > 0 and too_small:
        return [f"lora.r={cfg.lora.r} exceeds min(d, k) of {', '.join(too_small)}: lower lora.r"]
    return []


def attach_lora(model, cfg):
    """The model with LoRA attached through peft; with lora.method=full, the model itself, every weight trainable.
    With lora.init_from, the trained adapter there, trainable, and for a preference objective a frozen copy of it
    beside it (adapter "ref", lorafit.objectives.as_reference), removed again by drop_reference before the hooks."""
    if cfg.lora.method == "full":
        model.requires_grad_(True)
        return model
    from peft import PeftModel, get_peft_model

    if cfg.lora.init_from is None:
        model = get_peft_model(model, peft_config(cfg, model))
        _say_which_experts_train(model, cfg)
        return model
    path = init_from_dir(cfg.lora.init_from)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        if cfg.objective.name != "sft":
            model.load_adapter(str(path), adapter_name=REF_ADAPTER, is_trainable=False)
    except (RuntimeError, ValueError) as e:  # size mismatch, or no module of this base is the adapter's target
        raise UserError(f"lora.init_from={cfg.lora.init_from!r} does not fit {cfg.model.name}: "
                        f"{str(e).strip().splitlines()[-1][:200]}; start from an adapter trained on this base") from None
    c = model.peft_config["default"]
    log.info("lora.init_from: the adapter in %s (r=%s, alpha=%s, targets %s) trains on%s; lora.r, alpha and "
             "target_modules of this config are not used", path, c.r, c.lora_alpha, sorted({t.rsplit(".", 1)[-1] for t in c.target_modules}),
             ", its frozen copy is the reference" if cfg.objective.name != "sft" else "")
    return model


def init_from_dir(path: str) -> Path:
    """lora.init_from's adapter dir: the dir itself when it holds adapter_config.json, else a lorafit run dir's saved
    adapter (its hooks.save_adapter.dir), or one line saying what is missing."""
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "config.yaml").is_file():
        saved = (OmegaConf.load(p / "config.yaml").get("hooks") or {}).get("save_adapter") or {}
        adapter = p / saved.get("dir", "adapter")
        if (adapter / "adapter_config.json").is_file():
            return adapter
        raise UserError(f"lora.init_from={path!r} is a run dir without a saved adapter ({adapter} has no "
                        "adapter_config.json): did that run finish with the save_adapter hook?")
    raise UserError(f"lora.init_from={path!r}: no adapter_config.json there, and it is not a lorafit run dir")


def drop_reference(model) -> None:
    """Remove lora.init_from's frozen reference adapter: what is saved, analysed and merged is the trained one."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)


REF_ADAPTER = "ref"  # lora.init_from's frozen copy, a preference objective's reference
RUN_INFO = "lorafit.json"  # beside an adapter: what PEFT's format does not carry (see save)
CONVERTED_INITS = ("pissa", "olora")  # inits that move part of W into A0, B0: saved converted to plain LoRA
INITIAL_ADAPTER = "initial_adapter"  # run_dir/initial_adapter: A0, B0, what the saved adapter is converted against


def save_initial_adapter(model, cfg, run_dir) -> None:
    """For PiSSA/OLoRA, keep the initial factors A0, B0: they turn the trained adapter into a plain LoRA on the
    *original* base (ΔW = s·B·A − s·B0·A0, rank 2r), which vLLM, llama.cpp and the spectrum analysis all read
    correctly, instead of an adapter that only peft can load, by redoing the SVD of W at load time."""
    if cfg.lora.method != "lora" or cfg.lora.init not in CONVERTED_INITS:
        return
    config = model.peft_config["default"]
    config.init_lora_weights = True  # as peft's docs do: the saved initial adapter must not re-decompose W on load
    try:
        model.save_pretrained(str(run_dir / INITIAL_ADAPTER), safe_serialization=True)
    finally:
        config.init_lora_weights = PEFT_INIT[cfg.lora.init]


def save(model, cfg, run_dir, out, labels: list[str] | None) -> None:
    """The final adapter in plain PEFT format (PiSSA/OLoRA converted to plain LoRA on the original base), with
    lorafit.json beside it: the labels, the model and quant config in full, so `lorafit.merge` rebuilds the
    very base it trained on (double quant, storage, compute dtype, revision), and how texts were fed (_data_info)."""
    import json
    import warnings

    (out / RUN_INFO).write_text(json.dumps({"task": cfg.model.task, "labels": labels, "model": OmegaConf.to_container(cfg.model),
                                            "quant": OmegaConf.to_container(cfg.quant), "data": _data_info(cfg)}, indent=1))
    if not (cfg.lora.init in CONVERTED_INITS and cfg.lora.method == "lora"):
        model.save_pretrained(str(out), safe_serialization=True)
        return
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    # To convert, peft loads the initial adapter beside the trained one, and then warns that a PiSSA/OLoRA adapter
    # should be converted: the very conversion it is doing.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*changes the base weights", category=UserWarning)
        model.save_pretrained(str(out), safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(run_dir / INITIAL_ADAPTER))
    # peft 0.21's conversion keeps the LoRA factors only: put back what is saved in full (a seq_cls head).
    path = out / "adapter_model.safetensors"
    saved = load_file(path)
    full = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items() if ".lora_" not in k and k not in saved}
    if full:
        save_file({**saved, **full}, path, metadata={"format": "pt"})


def _data_info(cfg) -> dict:
    """How the run fed text to the model: `lorafit.generate` classifies new texts the same way (its columns, a
    sentence pair for two, cut at its max_length), not at the tokenizer's or the model's own limit."""
    from lorafit.data import GLUE_TASKS

    d = cfg.data
    columns = ["text"] if d.source == "bbc_news" else list(GLUE_TASKS[d.task][0]) if d.source == "glue" else list(d.text_columns)
    return {"max_length": d.max_length, "text_columns": columns if cfg.model.task == "seq_cls" else None}


def parameter_report(model) -> dict:
    """Trainable parameters in total and per module type (query, value, classifier, ...)."""
    by_type: dict[str, int] = defaultdict(int)
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts 4-bit weights by their quant_storage dtype
        trainable, total = model.get_nb_trainable_parameters()
    else:  # lora=full: a plain float model
        trainable, total = sum(p.numel() for p in model.parameters() if p.requires_grad), model.num_parameters()
    # peft's LoRA on a 3-D MoE tensor (target_parameters) sits in a wrapper named after the container (`experts`,
    # `experts.base_layer`): name it by the tensor it adapts
    tensors = {n: m.parameter_name for n, m in model.named_modules() if getattr(m, "parameter_name", "weight") != "weight"}
    for name, p in model.named_parameters():
        if p.requires_grad:  # trainable tensors are never quantized: numel is their count
            n = p.numel()
            parts = name.split(".")
            if "lora_A" in parts or "lora_B" in parts or "lora_magnitude_vector" in parts:
                at = max(i for i, s in enumerate(parts) if s.startswith("lora_"))
                key = tensors.get(".".join(parts[:at])) or parts[at - 1]
            else:
                key = next((h for h in HEAD_NAMES if h in parts), "other")
            by_type[key] += n
    return {"total": total, "trainable": trainable, "percent": 100.0 * trainable / max(total, 1),
            "by_module_type": dict(sorted(by_type.items()))}


def format_parameter_report(rep: dict) -> str:
    lines = [f"trainable params: {rep['trainable']:,} of {rep['total']:,} ({rep['percent']:.3f}%)"]
    lines += [f"  {k:<24s}{v:>12,}" for k, v in rep["by_module_type"].items()]
    return "\n".join(lines)
