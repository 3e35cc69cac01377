"""Merge adapters into their base and prove the merge is exact.

`python -m lorafit.merge PATH [PATH ...] --out DIR [--dtype fp32|bf16|fp16] [--base MODEL] [--weights W ...]
 [--combination sum|linear|svd|ties|cat] [--stream] [--overwrite]`

--out may be new, empty or an earlier merge; anything else only with --overwrite, and never an input, a folder
holding one, or the working directory (errors.check_output).

Which weights the update goes into:
- a float base: the base as trained, in the chosen dtype;
- a QLoRA (nf4/int8) base: the *dequantized* base. That is the function the adapter was trained and evaluated
  against, so the merged model computes what the QLoRA model computed. Adding s·B·A to 4-bit weights and
  re-quantizing instead changes the function (peft#2321, transformers#31293); merging into the original
  float weights gives a function the adapter never saw.
Verification runs the merged and the unmerged model on a probe batch and records max |logit difference|:
  merged vs unmerged  -- the adapter on the same (float or dequantized) base: must be ~0, or nothing is saved;
  merged vs trained   -- (in a run) the model in memory; for QLoRA that is the adapter on the 4-bit base.
`--stream` merges a sharded safetensors checkpoint one shard at a time (peak memory ~ one shard) and verifies
every merged module against W0·x + s·B·(A·x) on random probes instead of loading the whole model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.config import MERGE_DTYPES
from lorafit.errors import UserError, atomic_dir, check_output
from lorafit.export import GGUF_TYPES

# Max abs logit diff, relative to the logits' scale. A wrong merge (scaling, transposition, a missed module) is off
# by O(1); fp32 rounding alone reached 1.6e-4 on a tiny model trained at a high lr (float64: exact), hence 1e-3.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2}
PROBE_TEXTS = ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice in the final.",
               "A new phone chip promises longer battery life.", "Parliament votes on the budget next week."]


@torch.no_grad()
def logits(model, probe: dict) -> torch.Tensor:
    """The model's logits in its own dtype. A model accelerate prepared under mixed precision has its forward wrapped
    in autocast (the original kept as `_original_forward`): that one is called, so the trained model computes as the
    merged one does, instead of adding bf16's rounding (~2% of SmolLM2's logit scale) to a comparison of merges."""
    model.eval()
    device = next(model.parameters()).device
    forward = model.__dict__.get("_original_forward", model)  # unlike accelerate's unwrap, leaves the model as it is
    return forward(**{k: v.to(device) for k, v in probe.items() if k != "labels"}).logits.float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def merge_base(cfg, labels, dtype: str):
    """The float model to merge into: the base in `dtype`, dequantized when the run was quantized."""
    from omegaconf import OmegaConf

    from lorafit.models import DTYPES, build_model

    float_cfg = OmegaConf.merge(cfg, {"model": {"dtype": MERGE_DTYPES[dtype]},
                                      "quant": {"compute_dtype": MERGE_DTYPES[dtype]}})
    if cfg.quant.mode == "none":
        return build_model(float_cfg, labels, quantize=False)
    return build_model(float_cfg, labels, quantize=True).dequantize().to(DTYPES[MERGE_DTYPES[dtype]])


def trained_precision(cfg) -> str:
    """The lowest precision the trained model computes in outside autocast (see `logits`): its weights' dtype, or a
    QLoRA base's compute dtype. The merge can match it only to that precision."""
    dtypes = {cfg.model.dtype}
    if cfg.quant.mode == "nf4":
        dtypes.add(cfg.quant.compute_dtype)
    return next((k for k, v in (("fp16", "float16"), ("bf16", "bfloat16")) if v in dtypes), "fp32")


def quant_compute(cfg) -> str:
    """How the trained model's base computed: the function a QLoRA merge into the dequantized base reproduces."""
    if cfg.quant.mode == "nf4":
        return f"bitsandbytes nf4: dequantize, then {cfg.quant.compute_dtype} matmul (models.one_4bit_compute_path)"
    if cfg.quant.mode == "int8":
        return "bitsandbytes LLM.int8: int8 activations at inference, so merged vs trained is approximate"
    return "float base"


def merge_and_verify(base_model, adapter_dirs: list[Path], out_dir: Path, probe: dict, cfg, dtype: str = "fp32",
                     tokenizer=None, reference=None, weights: list[float] | None = None,
                     combination: str = "sum", overwrite: bool = False, flag: str = "--out", inputs=()) -> dict:
    """Load the adapter(s) onto base_model, merge, verify on `probe`, save atomically to out_dir (errors.atomic_dir:
    never over the adapters or `inputs`, a foreign non-empty dir only with `overwrite`; `flag` names out_dir).

    With `reference` (the trained model), the merged model must also match it, both computed without autocast, to the
    tolerance of the lowest precision the trained model holds or computes its base in. LLM.int8 is the exception: its
    inference quantizes activations, which no float merge reproduces, so that difference is recorded, not held to a
    tolerance."""
    from lorafit.saved import attach

    tied = _tied(base_model)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    peft_model = attach(base_model, adapter_dirs, getattr(base_model.config, "_name_or_path", "?"), names)
    weights = weights or [1.0 / len(adapter_dirs)] * len(adapter_dirs)
    if len(adapter_dirs) > 1:
        _scale_adapters(peft_model, names, weights)
        weighted_sum = logits(peft_model, probe)  # what a weighted merge should compute
        if combination != "sum":  # peft's combinations build one new adapter and apply the weights themselves
            _scale_adapters(peft_model, names, [1.0] * len(names))
            try:
                peft_model.add_weighted_adapter(names, weights, "combined", combination_type=combination,
                                                density=0.5 if combination == "ties" else None)
            except ValueError as e:  # e.g. linear/ties need one rank in all adapters
                raise UserError(f"--combination {combination}: {str(e).rstrip('.')}; --combination sum takes any ranks") from None
            peft_model.set_adapter("combined")
    unmerged = logits(peft_model, probe)
    merged_model = peft_model.merge_and_unload()
    merged = logits(merged_model, probe)
    scale = max(1.0, float(unmerged.abs().max()))
    report = {"dtype": dtype, "adapters": [str(d) for d in adapter_dirs], "probe_rows": int(len(unmerged)),
              "logit_scale": scale, "max_abs_diff_merged_vs_unmerged": max_diff(merged, unmerged),
              "tolerance": TOLERANCE[dtype] * scale, "tied_embeddings": tied and _tied(merged_model),
              "base_compute": quant_compute(cfg)}
    if len(adapter_dirs) > 1:
        # Recorded for every combination: only `sum` is Σ wᵢ·ΔWᵢ (there it is the merged-vs-unmerged check itself);
        # peft's linear is (Σ√wᵢ·Bᵢ)(Σ√wᵢ·sᵢ·Aᵢ), with cross terms; ties trims and elects signs.
        report.update(combination=combination, weights=weights,
                      max_abs_diff_merged_vs_weighted_sum=max_diff(merged, weighted_sum))
    if report["max_abs_diff_merged_vs_unmerged"] > report["tolerance"]:
        raise UserError(f"merge check failed: merged and unmerged logits differ by "
                        f"{report['max_abs_diff_merged_vs_unmerged']:.3g} > {report['tolerance']:.3g}; nothing was saved")
    if reference is not None:
        report["max_abs_diff_merged_vs_trained"] = max_diff(merged, logits(reference, probe))
        from lorafit.models import routed_experts

        precision = trained_precision(cfg)
        if routed_experts(base_model.config) and precision != "fp32":
            # An MoE's top-k router turns rounding into other experts: tiny-qwen3-moe's base alone, nf4 computing in
            # bf16 vs its fp32 dequantization, differs by 0.31 (a dense Qwen3 by 0.07). Recorded, not held to bf16's
            # tolerance; the merge itself is checked above, merged vs unmerged in fp32.
            report["vs_trained"] = f"recorded only: top-k expert routing amplifies {precision} rounding"
        elif cfg.quant.mode != "int8":
            report["tolerance_vs_trained"] = max(TOLERANCE[dtype], TOLERANCE[precision]) * scale
            if report["max_abs_diff_merged_vs_trained"] > report["tolerance_vs_trained"]:
                raise UserError(f"merge check failed: the merged model and the trained model differ by "
                                f"{report['max_abs_diff_merged_vs_trained']:.3g} > {report['tolerance_vs_trained']:.3g} "
                                f"(the trained model computes in {precision}); nothing was saved")
    if tied and not report["tied_embeddings"]:
        raise UserError("merge untied the input and output embeddings; nothing was saved")
    with atomic_dir(out_dir, "merged", [*adapter_dirs, *inputs], overwrite, flag) as tmp:
        merged_model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
    return report


def _scale_adapters(peft_model, names: list[str], weights: list[float]) -> None:
    """Every adapter in `names` active, each scaled by its weight through peft's own set_scale (which knows rsLoRA's
    √r): the model computes W0·x + Σ wᵢ·sᵢ·Bᵢ·Aᵢ·x, whatever the ranks, and merging it merges exactly Σ wᵢ·ΔWᵢ."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    if any(m.use_dora.get(n, False) for m in layers for n in names):
        raise UserError("DoRA adapters normalize W0 + ΔW each on its own and have no weighted sum; merge one at a time")
    for m in layers:
        for name, w in zip(names, weights):
            m.set_scale(name, w)
    peft_model.base_model.set_adapter(names)


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


# --- streaming merge: bounded memory for sharded checkpoints ------------------------------------------------------

def stream_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str | None = None, allow_pickle: bool = False,
                 probes: int = 8, overwrite: bool = False) -> dict:
    """Merge shard by shard: read a shard, add s·B·A to its targeted tensors, write it, free it."""
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from lorafit.analysis.base import _match
    from lorafit.analysis.spectrum import lora_factors, read_adapter
    from lorafit.models import DTYPES

    _return_freed_memory_promptly()
    config, state = read_adapter(adapter_dir, allow_pickle=allow_pickle)
    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    factors, skipped = lora_factors(config, state)
    if any(f.magnitude is not None or f.kind == "expert" for f in factors) or skipped:
        raise UserError("--stream merges plain LoRA factors only (no DoRA, MoE experts or incomplete factors); "
                        "merge without --stream")
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise UserError(f"--stream: no .safetensors shards in {base_dir}")
    keys = {k: shard for shard in shards for k in _header(shard)[0]}
    targets = {}
    for f in factors:
        key = _match(f.name, keys)
        if key is None:
            raise UserError(f"--stream: no weight for adapted module {f.name} in {base_dir}; is it the adapter's base?")
        targets[key] = f
    replaced = {}  # modules_to_save (e.g. a classifier head): base key -> the adapter's tensor
    for k, v in state.items():
        if ".lora_" not in k:
            module, _, tensor = k.removeprefix("base_model.model.").rpartition(".")
            replaced[_match(module, keys, tensor) or k] = v
    fan_in_fan_out, out_dtype = config.get("fan_in_fan_out", False), DTYPES[MERGE_DTYPES[dtype]] if dtype else None
    probe_errors, g = {}, torch.Generator().manual_seed(0)  # {merged dtype: max relative module-output error}
    with atomic_dir(out_dir, "merged", (base_dir, adapter_dir), overwrite) as tmp:
        for shard in tqdm(shards, desc="merge shards", disable=len(shards) < 2):
            header, start = _header(shard)
            with open(shard, "rb") as src:
                tensors = _merged_tensors(src, header, start, targets, replaced, lora_config, fan_in_fan_out, out_dtype,
                                          probe_errors, g, probes)
                _write_streaming(tmp / shard.name, header, tensors, out_dtype)
        if replaced:
            raise UserError(f"--stream: the base has no tensors {sorted(replaced)[:3]} that the adapter saves in full")
        for extra in base_dir.iterdir():  # config, tokenizer, shard index: unchanged
            if extra.is_file() and extra.suffix != ".safetensors":
                shutil.copy2(extra, tmp / extra.name)
        if out_dtype is not None and (tmp / "config.json").is_file():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["dtype"] = cfg["torch_dtype"] = MERGE_DTYPES[dtype]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        report = {"mode": "stream", "shards": len(shards), "merged_modules": len(targets),
                  "max_abs_diff_module_probe": max(probe_errors.values(), default=0.0), "dtype": dtype or "as base"}
        for merged_dtype, err in probe_errors.items():  # the tolerance of the dtype each module was merged in
            if err > TOLERANCE[merged_dtype]:
                raise UserError(f"--stream merge check failed: a merged {merged_dtype} module's output is off by "
                                f"{err:.3g} (relative) > {TOLERANCE[merged_dtype]}; nothing was saved")
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
    return report


def _merged_tensors(src, header: dict, start: int, targets: dict, replaced: dict, lora_config, fan_in_fan_out: bool,
                    out_dtype, probe_errors: dict, g, probes: int):
    """One shard's tensors, one at a time (peak memory ~ the largest tensor, not the shard), with s·B·A added to the
    targeted ones, the worst probe error per merged dtype kept in `probe_errors`, and modules_to_save swapped in."""
    for key, meta in header.items():
        W = _read(src, meta, start)
        if key in targets:
            f = targets[key]
            delta = (f.B @ f.A) * f.scale  # peft's order of operations: bitwise equal in fp32
            delta = delta.T if fan_in_fan_out or f.kind == "embedding" else delta
            merged = (W.float() + delta).to(W.dtype)
            del delta
            name = DTYPE_NAMES.get(merged.dtype, "fp32")
            error = _probe_module(W, merged, f, lora_config, fan_in_fan_out, g, probes)
            probe_errors[name] = max(probe_errors.get(name, 0.0), error)
            W = merged
        elif key in replaced:
            if replaced[key].shape != W.shape:
                raise UserError(f"--stream: the adapter saves {key} with shape {list(replaced[key].shape)}, but the "
                                f"base has {list(W.shape)}; is it the adapter's base?")
            W = replaced.pop(key).to(W.dtype)
        yield key, W.to(out_dtype) if out_dtype is not None and W.is_floating_point() else W


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


ST_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # keys of TOLERANCE


def _return_freed_memory_promptly() -> None:
    """glibc serves blocks up to 32 MiB from its heap and keeps them after free, so a loop over 20-50 MiB tensors
    ratchets the peak up; with mmap for every block over 1 MiB, freed tensors go straight back to the OS."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _header(path: Path) -> tuple[dict, int]:
    """(tensor entries in file order, offset of the data section) of a safetensors file."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])), 8 + n


def _read(f, meta: dict, start: int) -> torch.Tensor:
    """One tensor by plain reads: unlike safetensors' mmap, nothing of the rest of the file stays resident."""
    begin, end = meta["data_offsets"]
    t = torch.empty(meta["shape"], dtype=ST_TO_TORCH[meta["dtype"]])
    f.seek(start + begin)
    if end > begin:
        f.readinto(t.view(-1).view(torch.uint8).numpy())
    return t


def _write_streaming(path: Path, src_header: dict, tensors, out_dtype) -> None:
    """Write a safetensors file tensor by tensor. The header (names, dtypes, shapes, offsets) is known up front
    from the source shard, since a merge keeps every shape; `save_file` would need the whole shard in memory."""
    import struct

    header, offset = {}, 0
    for key, meta in src_header.items():
        dtype = ST_TO_TORCH[meta["dtype"]]
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        size = torch.Size(meta["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": meta["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, t in tensors:
            begin, end = header[key]["data_offsets"]
            if SAFETENSORS_DTYPES[t.dtype] != header[key]["dtype"] or t.numel() * t.element_size() != end - begin:
                raise RuntimeError(f"stream merge: {key} would be written as {t.dtype} {list(t.shape)}, not as the "
                                   f"header says ({header[key]['dtype']} {header[key]['shape']})")
            if t.numel():
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy())


def _probe_module(W0, merged, f, lora_config, fan_in_fan_out: bool, g, n: int, rows: int = 1024) -> float:
    """Relative |merged·x − y| on random x, where y = W0·x + the adapter's own output for this module: for a
    Linear, peft's LoRA layer with peft's rank and alpha patterns and scaling (not the scale the merge took from
    lora_factors); for Conv1D and embedding LoRA, s·B·(A·x). Row blocks keep the float copies small."""
    if fan_in_fan_out or f.kind == "embedding":
        W0, merged = W0.T, merged.T  # as d_out × d_in (views)
    x = torch.randn(n, merged.shape[1], generator=g)
    if f.kind == "linear" and not fan_in_fan_out:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.utils.other import get_pattern_key

        r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), f.name), lora_config.r)
        alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), f.name), lora_config.lora_alpha)
        base = torch.nn.Linear(merged.shape[1], merged.shape[0], bias=False, device="meta")  # W0 is added below
        layer = LoraLinear(base, "default", config=lora_config, r=r, lora_alpha=alpha, init_lora_weights=False)
        layer.load_state_dict({"lora_A.default.weight": f.A, "lora_B.default.weight": f.B}, strict=False, assign=True)
        with torch.no_grad():
            low = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    else:
        low = (x @ f.A.T) @ f.B.T * f.scale
    err = top = 0.0
    for i in range(0, merged.shape[0], rows):
        want = x @ W0[i : i + rows].float().T + low[:, i : i + rows]
        err = max(err, float((x @ merged[i : i + rows].float().T - want).abs().max()))
        top = max(top, float(want.abs().max()))
    return err / max(top, 1e-12)


# --- CLI -----------------------------------------------------------------------------------------------------------

def _probe(tokenizer, cfg_model) -> dict:
    """The probe batch the merge is verified on: real text when there is a tokenizer, random token ids otherwise."""
    from lorafit.data import collate
    from lorafit.models import load_config

    if tokenizer is not None:
        enc = tokenizer(PROBE_TEXTS, truncation=True, max_length=64)
        return collate([{k: enc[k][i] for k in enc} for i in range(len(PROBE_TEXTS))], tokenizer.pad_token_id)
    vocab = load_config(cfg_model).vocab_size
    ids = torch.randint(0, vocab, (len(PROBE_TEXTS), 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lorafit.merge", description="Merge LoRA adapters into their base, verified.")
    p.add_argument("paths", nargs="+", help="lorafit run dirs or PEFT adapter dirs (several: a weighted combination)")
    p.add_argument("--out", required=True, help="where to write the merged transformers model")
    p.add_argument("--dtype", default="fp32", choices=list(MERGE_DTYPES))
    p.add_argument("--base", help="base model (alias, local dir, hub id); default: the adapter's base_model_name_or_path")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: equal)")
    p.add_argument("--combination", default="sum", choices=["sum", "linear", "svd", "ties", "cat"],
                   help="sum (default): exactly Σ wᵢ·ΔWᵢ; the others are peft's add_weighted_adapter combinations")
    p.add_argument("--stream", action="store_true", help="shard-by-shard merge of a safetensors checkpoint (bounded memory)")
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (a pickle: only if you trust it)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the base's own Python code (auto_map), only if you trust it")
    p.add_argument("--gguf", choices=GGUF_TYPES, help="also write OUT/model-TYPE.gguf for llama.cpp / Ollama (decoders of "
                   "lorafit.export.GGUF_FAMILIES)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not empty and not a merged model")
    return p.parse_args(argv)


@user_errors_as_one_line
def main(argv=None) -> dict:
    quiet_libraries()
    from lorafit.saved import base_name, run_config, saved_tokenizer
    from lorafit.analysis.spectrum import adapter_dir, read_adapter
    from lorafit.models import resolve

    args = parse_args(argv)
    dirs = [adapter_dir(p) for p in args.paths]
    config, state = read_adapter(dirs[0], allow_pickle=args.allow_pickle)  # refuses pickles and corrupt files
    for d in dirs[1:]:
        other, _ = read_adapter(d, allow_pickle=args.allow_pickle)
        if config.get("modules_to_save") or other.get("modules_to_save"):
            raise UserError(f"{dirs[0]} and {d} each train modules in full ({config.get('modules_to_save') or other.get('modules_to_save')}, "
                            "e.g. a seq_cls head), which a weighted LoRA combination can't mix; merge one adapter at a time")
    if args.weights and len(args.weights) != len(dirs):
        raise UserError(f"--weights has {len(args.weights)} values for {len(dirs)} adapters")
    base = base_name(dirs[0], config, args.base)
    out = Path(args.out)
    # What --out must never replace: the adapters, the run dirs holding them, a local base. Checked before any work.
    inputs = [*dirs, *args.paths, *([Path(base).expanduser()] if Path(base).expanduser().is_dir() else [])]
    check_output(out, "merged", inputs, args.overwrite)
    if args.stream:
        if len(dirs) > 1:
            raise UserError("--stream merges one adapter at a time")
        report = stream_merge(Path(resolve(base)), dirs[0], out, args.dtype, args.allow_pickle, overwrite=args.overwrite)
        print(f"merged {report['merged_modules']} modules over {report['shards']} shards into {out}; "
              f"max relative module-probe error {report['max_abs_diff_module_probe']:.2e}")
        return _export(report, out, args.gguf)
    cfg, info = run_config(dirs[0], state, config, base, args.trust_remote_code)
    tokenizer = saved_tokenizer(cfg.model, dirs[0])
    probe = _probe(tokenizer, cfg.model)
    report = merge_and_verify(merge_base(cfg, info.get("labels"), args.dtype), dirs, out, probe, cfg, args.dtype,
                              tokenizer, weights=args.weights, combination=args.combination, overwrite=args.overwrite,
                              inputs=inputs)
    print(f"merged into {out} ({args.dtype}); max |logit diff| merged vs unmerged = "
          f"{report['max_abs_diff_merged_vs_unmerged']:.2e} (tolerance {report['tolerance']:.1e})")
    if args.combination != "sum" and len(dirs) > 1:
        print(f"--combination {args.combination} is not the weighted sum Σ wᵢ·ΔWᵢ: max |logit diff| from it = "
              f"{report['max_abs_diff_merged_vs_weighted_sum']:.2e}")
    return _export(report, out, args.gguf)


def _export(report: dict, out: Path, qtype: str | None) -> dict:
    """--gguf: the verified merged model, also as one GGUF file beside it."""
    if qtype is not None:
        from lorafit.export import to_gguf

        report["gguf"] = to_gguf(out, qtype)
        (out / "merge_report.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {report['gguf']['file']} ({report['gguf']['bytes'] / 2**20:.1f} MiB, tokenizer.ggml.pre="
              f"{report['gguf']['tokenizer_pre']})")
    return report


if __name__ == "__main__":
    main()
