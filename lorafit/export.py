"""GGUF files for llama.cpp and Ollama: a merged model (`lorafit.merge ... --gguf f16|q8_0`, or
`python -m lorafit.export MODEL_DIR --out model.gguf`), and a trained adapter as a GGUF LoRA for llama.cpp's `--lora`
over the base's own GGUF (`python -m lorafit.export RUN --out adapter.gguf`).

Written with the `gguf` package (llama.cpp's own writer and tensor-name map), the way llama.cpp's converters
(convert_hf_to_gguf.py, convert_lora_to_gguf.py) write these families: Llama and Mistral (llama.cpp's "llama"
architecture) with q/k permuted to its rotary layout; Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorms), Qwen3-MoE (experts
stacked per projection, the router in fp32), Gemma 2 and 3 (norms stored as 1 + w, soft-capping, the sliding-window
layer pattern) and Phi-3 (fused qkv and gate_up) in HF's layout;
norms in fp32, a tied lm_head left out (llama.cpp then reuses the token embeddings), the byte-level BPE vocab with
merges, special ids and the chat template. tests/test_gguf_llama_cpp.py runs every family's files in llama.cpp itself
(llama-cpp-python) against the merged HF model: tokens, logits (f16, q8_0, base + LoRA) and the chat template. Only
what has been run is accepted: these families with default RoPE and a byte-level BPE tokenizer whose pre-tokenizer
llama.cpp is known to share; anything else (other MoEs, SentencePiece vocabs, RoPE scaling) is refused in one line.
A GGUF LoRA carries Linear layers' factors only: an adapter on MoE experts is merged instead.
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.errors import UserError

GGUF_TYPES = ("f16", "q8_0")  # config.GgufType
GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3")  # see _archs
GEMMAS = ("gemma2", "gemma3_text")

# llama.cpp picks its pre-tokenizer regex by `tokenizer.ggml.pre`, which its converter finds by hashing the token ids
# of this probe text; an unknown hash is an error there, and here. Hashes checked here: SmolLM2's tokenizer gives the
# first (llama.cpp's "smollm"). Beyond those, a pre-tokenizer that is exactly one llama.cpp has by name is that one,
# whatever the vocab: GPT-2's own (ByteLevel with its regex) is "gpt-2"; Qwen2's split regex then ByteLevel is "qwen2"
# (transformers 5 gives every qwen2/qwen3 model dir Qwen2Tokenizer's).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
PRE_TOKENIZER_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
                       "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 "
                       "33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2"
                       "\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
                       "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
                       "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
                       "I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm"}


def to_gguf(model_dir: Path, qtype: str = "f16", out_file: Path | None = None) -> dict:
    """Write the HF model in `model_dir` as `out_file` (default model_dir/model-QTYPE.gguf), `qtype` for 2-D weights;
    return what was written."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config, archs = AutoConfig.from_pretrained(model_dir), _archs()
    if config.model_type not in archs:
        raise UserError(f"--gguf exports {', '.join(archs)} models; {model_dir} is {config.model_type!r}. Use "
                        "llama.cpp's convert_hf_to_gguf.py on the merged dir")
    arch, permute = archs[config.model_type]
    rope = getattr(config, "rope_parameters", None) or {}
    ropes = list(rope.values()) if "full_attention" in rope else [rope]  # Gemma 3: one per layer type
    if any(r.get("rope_type", "default") != "default" for r in ropes) or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"--gguf: {model_dir} uses RoPE scaling or partial rotary dims ({rope}), which this exporter "
                        "does not write; use llama.cpp's convert_hf_to_gguf.py on the merged dir")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        raise UserError(f"--gguf needs the tokenizer in {model_dir}: a GGUF file carries its vocab") from None
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    qt = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]

    out_file = Path(out_file or Path(model_dir) / f"model-{qtype}.gguf")
    tmp = out_file.with_name(f".{out_file.name}.tmp")  # renamed into place once complete
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(_name(Path(model_dir).name, tokenizer.get_vocab()))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)  # as the converter does where config.head_dim is set (Qwen3: not hidden / heads)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("full_attention", rope).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    _family_keys(writer, config, model_dir, head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    pre = _vocab(writer, tokenizer, model_dir, config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"--gguf: no safetensors weights in {model_dir}")
    counts, experts = {}, {}
    for f in files:
        with safe_open(f, "pt") as h:
            for key, w in _stacked_experts(h, config, experts):
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"--gguf: tensor {key!r} of {f.name} has no llama.cpp name; not a plain "
                                    f"{config.model_type}")
                w = w.float()
                if config.model_type in GEMMAS and key.endswith("norm.weight"):
                    w = w + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
                if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
                    w = _permute(w, n_head)
                elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
                    w = _permute(w, n_kv)
                # the router stays fp32, as llama.cpp's converter keeps it (a rounded logit can flip the top-k)
                data, kind = _encode(w, gguf.GGMLQuantizationType.F32 if key.endswith("mlp.gate.weight") else qt, gguf)
                writer.add_tensor(name, data, raw_dtype=kind)
                counts[kind.name] = counts.get(kind.name, 0) + 1
    if experts:
        raise UserError(f"--gguf: {model_dir} lacks some experts' weights (e.g. {next(iter(experts))})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return {"file": str(out_file), "type": qtype, "tensors": counts, "tokenizer_pre": pre,
            "bytes": out_file.stat().st_size}


def _archs():
    import gguf

    A = gguf.MODEL_ARCH
    # model_type: (llama.cpp architecture, whether q/k are permuted to its rotary layout), as convert_hf_to_gguf.py
    # maps them (MistralForCausalLM is its LlamaModel; the others keep HF's layout: NEOX rope in llama.cpp).
    return dict(zip(GGUF_FAMILIES, [(A.LLAMA, True), (A.LLAMA, True), (A.QWEN2, False), (A.QWEN3, False),
                                    (A.QWEN3MOE, False), (A.GEMMA2, False), (A.GEMMA3, False), (A.PHI3, False)]))


def _family_keys(writer, config, model_dir: Path, head_dim: int) -> None:
    """The keys a family adds, as convert_hf_to_gguf.py writes them (conversion/gemma.py, phi.py); what llama.cpp
    would compute otherwise than transformers is refused."""
    kind, window = config.model_type, getattr(config, "sliding_window", None)
    window = window if getattr(config, "use_sliding_window", True) else None  # Qwen2 keeps a window it does not use
    refuse = lambda why: UserError(f"--gguf: {model_dir} ({kind}) {why}, which this exporter does not write; use "
                                   "llama.cpp's convert_hf_to_gguf.py on the merged dir")
    if kind in GEMMAS:
        if config.query_pre_attn_scalar != head_dim:  # llama.cpp scales queries by 1/sqrt(head_dim) (but for 27B)
            raise refuse(f"scales queries by 1/sqrt({config.query_pre_attn_scalar}), not 1/sqrt(head_dim)")
        if window:  # the pattern per layer, as transformers has it (llama.cpp's default is every 2nd / 6th layer)
            writer.add_sliding_window(window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        if kind == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if kind == "gemma3_text" and "sliding_attention" in config.rope_parameters:
            writer.add_rope_freq_base_swa(float(config.rope_parameters["sliding_attention"]["rope_theta"]))
    elif kind == "phi3":
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        writer.add_sliding_window(window or 0)
    elif kind == "qwen3_moe":  # conversion/qwen.py, Qwen2MoeModel; llama.cpp's qwen3moe graph: every layer routed,
        if not config.norm_topk_prob:  # the top-k weights renormalized (build_moe_ffn(..., norm_w=true, ...))
            raise refuse("does not renormalize its top-k routing weights (norm_topk_prob false)")
        if config.decoder_sparse_step != 1 or config.mlp_only_layers:
            raise refuse("has dense MLP layers among its MoE layers")
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    elif window:
        raise refuse(f"uses sliding-window attention ({window})")


def _name(name: str, vocab: dict) -> str:
    """general.name. llama.cpp sets Phi-3's special-token attributes by the model's name: a name holding "phi3" or
    "phi-3" makes its loader look up </s>, <unk>, <s> and <|endoftext|> and fail ("unordered_map::at") on a vocab
    without one of them, so such a vocab gets the name without the "3"."""
    if re.search("phi-?3", name, re.I) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= vocab.keys():
        return re.sub("phi-?3", "phi", name, flags=re.I)
    return name


EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _stacked_experts(h, config, pending: dict):
    """(key, tensor) of a checkpoint file, an MoE layer's experts as one 3-D tensor per projection
    (`...mlp.experts.gate_proj.weight`: experts × out × in), as llama.cpp's converter stacks them. A checkpoint keeps
    each expert apart (transformers 5 splits its fused experts on save); a fused gate_up_proj is split in two."""
    for key in h.keys():  # noqa: SIM118 (safe_open is no dict)
        m = EXPERT_KEY.fullmatch(key)
        if m is None and key.endswith("mlp.experts.gate_up_proj"):  # experts × 2·ff × hidden, gate rows first
            w = h.get_tensor(key)
            yield f"{key[:-len('gate_up_proj')]}gate_proj.weight", w[:, : w.shape[1] // 2]
            yield f"{key[:-len('gate_up_proj')]}up_proj.weight", w[:, w.shape[1] // 2:]
        elif m is None:
            yield (f"{key}.weight" if key.endswith("mlp.experts.down_proj") else key), h.get_tensor(key)
        else:
            layer = pending.setdefault((m[1], m[3]), {})
            layer[int(m[2])] = h.get_tensor(key)
            if len(layer) == config.num_experts:
                del pending[(m[1], m[3])]
                yield f"{m[1]}.{m[3]}.weight", torch.stack([layer[e] for e in range(config.num_experts)])


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (the two halves of each head) -> llama.cpp's (interleaved pairs), as its converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: torch.Tensor, qt, gguf) -> tuple[np.ndarray, object]:
    """1-D tensors (norms) stay fp32, as in llama.cpp; matrices go to `qt`, or f16 where a row does not split
    into Q8_0's blocks of 32."""
    if w.dim() == 1:
        return w.numpy(), gguf.GGMLQuantizationType.F32
    if qt == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w.numpy(), qt), qt
    return w.half().numpy(), gguf.GGMLQuantizationType.F16


def _named_pre_tokenizer(spec: dict) -> str | None:
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    parts = spec.get("pretokenizers") or []
    if (spec.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and parts[0].get("behavior") == "Isolated"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "qwen2"
    return None


def _vocab(writer, tokenizer, model_dir: Path, n_vocab: int) -> str:
    """The byte-level BPE vocab, token types, merges, special ids and chat template; returns tokenizer.ggml.pre."""
    import gguf

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"--gguf exports byte-level BPE tokenizers; {model_dir}'s is {model.get('type')!r}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # the embedding has rows the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    pre = PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest())
    if pre is None:
        pre = _named_pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {})
    if pre is None:
        raise UserError(f"--gguf: {model_dir}'s tokenizer has a pre-tokenizer llama.cpp is not known to share; use "
                        "llama.cpp's convert_hf_to_gguf.py, which knows more")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if special.chat_template is None and tokenizer.chat_template:  # transformers 5 keeps it in chat_template.jinja
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer)
    return pre


def lora_to_gguf(adapter: Path, out_file: Path, base: str | None = None) -> dict:
    """A trained adapter -> a GGUF LoRA adapter for llama.cpp's `--lora` over the base's own GGUF, written as
    convert_lora_to_gguf.py writes one: general.type adapter, each targeted weight's `NAME.lora_a` (r × in) and
    `NAME.lora_b` (out × r) under the base tensor's llama.cpp name, B's rows permuted as the base's q/k rows are.
    llama.cpp scales a pair by alpha / r with one alpha per file; each module's own scale (rank_pattern,
    alpha_pattern, rsLoRA) is folded into its B instead, and adapter.lora.alpha is 0, which llama.cpp reads as
    scale 1 (times the user's --lora-scaled)."""
    import gguf
    from transformers import AutoConfig

    from lorafit.analysis.spectrum import adapter_dir, lora_factors, read_adapter
    from lorafit.models import resolve

    adapter = adapter_dir(adapter)
    config, state = read_adapter(adapter)
    factors, skipped = lora_factors(config, state)
    odd = sorted({f.name for f in factors if f.kind != "linear" or f.magnitude is not None} | {s["name"] for s in skipped})
    if odd or config.get("modules_to_save") or config.get("use_dora"):
        raise UserError(f"--gguf-lora writes plain LoRA on Linear layers; {adapter} also has "
                        f"{odd[:3] or config.get('modules_to_save') or 'DoRA'}: merge it instead (lorafit.merge --gguf)")
    base = base or config.get("base_model_name_or_path")
    try:
        model_config = AutoConfig.from_pretrained(resolve(base))
    except (OSError, ValueError, TypeError):
        raise UserError(f"--gguf-lora: the base {base!r} has no readable config.json; pass --base") from None
    archs = _archs()
    if model_config.model_type not in archs:
        raise UserError(f"--gguf-lora writes adapters of {', '.join(archs)} models; {base} is {model_config.model_type!r}")
    arch, permute = archs[model_config.model_type]
    names = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    heads = {"q_proj": model_config.num_attention_heads, "k_proj": model_config.num_key_value_heads}

    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scales folded into B (see above)
    for f in factors:
        name = names.get_name(f.name.removeprefix("base_model.model.") + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise UserError(f"--gguf-lora: module {f.name!r} has no llama.cpp tensor name")
        B = f.scale * f.B
        if permute and f.name.rsplit(".", 1)[-1] in heads:
            B = _permute(B, heads[f.name.rsplit(".", 1)[-1]])
        writer.add_tensor(f"{name}.lora_a", f.A.float().contiguous().numpy())
        writer.add_tensor(f"{name}.lora_b", B.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return {"file": str(out_file), "modules": len(factors), "bytes": out_file.stat().st_size}


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m lorafit.export", description="Write GGUF files for llama.cpp.")
    p.add_argument("path", help="a lorafit run dir or PEFT adapter dir (a GGUF LoRA adapter), or a model dir")
    p.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    p.add_argument("--type", choices=GGUF_TYPES, default="f16", help="a model dir's matrices: f16 or q8_0")
    p.add_argument("--base", help="an adapter's base (default: its base_model_name_or_path)")
    return p.parse_args(argv)


@user_errors_as_one_line
def main(argv=None) -> dict:
    """`python -m lorafit.export RUN --out adapter.gguf`: the adapter for `llama-cli -m base.gguf --lora adapter.gguf`;
    `python -m lorafit.export MODEL_DIR --out base.gguf`: a model dir (the base, or a merged model) as one GGUF."""
    from lorafit.analysis.spectrum import adapter_dir

    quiet_libraries()
    args = parse_args(argv)
    path = Path(args.path)
    if args.out.exists():
        raise UserError(f"--out {args.out} exists; lorafit does not overwrite it: remove it or choose another name")
    if (adapter_dir(path) / "adapter_config.json").is_file():
        report = lora_to_gguf(path, args.out, args.base)
        print(f"wrote a GGUF LoRA adapter ({report['modules']} modules, {report['bytes']:,} bytes): {args.out}")
        return report
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither an adapter (adapter_config.json) nor a model dir (config.json)")
    report = to_gguf(path, args.type, args.out)
    print(f"wrote {args.out} ({args.type}, {report['bytes']:,} bytes)")
    return report


if __name__ == "__main__":
    main()
