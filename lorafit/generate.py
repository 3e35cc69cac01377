"""Try a trained model: generate (causal LM) or classify (seq_cls) from a run dir, an adapter dir or a merged dir.

`python -m lorafit.generate PATH [--prompt TEXT ...] [--file prompts.jsonl --out outputs.jsonl] [--chat]
 [--max-new-tokens N] [--temperature T] [--top-p P] [--base MODEL] [--trust-remote-code]`

An adapter is put back on the very base it trained on (lorafit.json: QLoRA bases are re-quantized as trained);
a merged dir (or a lora=full run's model/) loads alone. A classifier reads its texts as its run did: the run's
data.text_columns (two: a sentence pair, given as --file rows with those fields), cut at its data.max_length. Prompts go through the model's chat template where it has one, as in training; greedy
decoding unless --temperature > 0. `generate()` is also what the training loop's generation eval calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.cli import quiet_libraries, user_errors_as_one_line
from lorafit.data import prompt_text
from lorafit.errors import UserError


@dataclass
class Loaded:
    model: object
    tokenizer: object
    task: str  # seq_cls | causal_lm
    labels: list[str] | None
    data: dict  # the run's data settings (lorafit.json): max_length, text_columns; {} when unknown


def load(path: str | Path, base: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> Loaded:
    """The model at `path` (merged dir, adapter dir, run dir holding adapter/ or, lora=full, model/), in eval mode.
    The model's own Python code (auto_map) runs only with `trust_remote_code`, whatever a saved config says."""
    from omegaconf import OmegaConf

    from lorafit.saved import attach, base_name, run_config, saved_run_info, saved_tokenizer
    from lorafit.analysis.spectrum import ADAPTER_CONFIG, adapter_dir, read_adapter
    from lorafit.config import ModelConfig
    from lorafit.models import auto_class, build_model, build_tokenizer, load_config

    path = Path(path)
    if (path / "model" / "config.json").is_file() and not (adapter_dir(path) / ADAPTER_CONFIG).is_file():
        path = path / "model"  # a lora=full run dir: its trained model, whole
    if (path / "config.json").is_file() and not (adapter_dir(path) / ADAPTER_CONFIG).is_file():  # a merged model
        cfg_model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": str(path), "trust_remote_code": trust_remote_code})
        arch = " ".join(load_config(cfg_model).architectures or [])
        task = "seq_cls" if "ForSequenceClassification" in arch else "causal_lm"
        model = auto_class(task).from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if task == "seq_cls" else None
        data = (saved_run_info(path) or {}).get("data") or {}  # lora=full runs save lorafit.json beside the model
        return Loaded(model.eval(), build_tokenizer(cfg_model), task, labels, data)
    adir = adapter_dir(path)
    config, state = read_adapter(adir, allow_pickle=allow_pickle)  # one clear line for a missing or corrupt adapter
    base = base_name(adir, config, base)
    cfg, info = run_config(adir, state, config, base, trust_remote_code)
    tokenizer = saved_tokenizer(cfg.model, adir)
    if tokenizer is None:
        raise UserError(f"no tokenizer beside {adir} or with the base {base!r}: generation needs one")
    model = attach(build_model(cfg, info.get("labels")), [adir], base)
    return Loaded(model.eval(), tokenizer, info["task"], info.get("labels"), info.get("data") or {})


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 8, streamer=None, synced: bool = False) -> list[str]:
    """Continuations of already-templated prompts, batched with left padding (so every row ends where its reply
    starts); greedy when temperature is 0. `synced`: every process of a sharded model calls this together."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device, out = next(model.parameters()).device, []
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 streamer=streamer, top_k=None, synced_gpus=synced, **sampling)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def generation_eval(rows: list[dict], tokenizer, cfg, accelerator, run_dir: Path):
    """eval.generate: a function (model, step) -> {exact_match, rouge_l} that generates replies to `rows` (greedy,
    on the main process), scores them against the references, and keeps the samples: generations.jsonl in the run
    dir, and a prompt / reference / output table on W&B. A sharded model (FSDP, DeepSpeed) needs every process in
    each forward: there all processes generate the same replies, in step (transformers' synced_gpus)."""
    from lorafit import checkpoint, metrics

    prompts = [prompt_text(tokenizer, r["turns"]) for r in rows]
    sharded = accelerator.distributed_type in checkpoint.SHARDED

    def score(model, step: int) -> dict:
        if not (accelerator.is_main_process or sharded):
            return {}
        with accelerator.autocast():  # the precision evaluation runs in
            outputs = generate(accelerator.unwrap_model(model), tokenizer, prompts, cfg.eval.max_new_tokens,
                               synced=sharded)
        if not accelerator.is_main_process:
            return {}
        write_samples([{"step": step, "prompt": p, "reference": r["reference"], "output": o}
                       for p, r, o in zip(prompts, rows, outputs)], run_dir, cfg, accelerator, step)
        return {f"gen_{k}": v for k, v in metrics.generation(outputs, [r["reference"] for r in rows]).items()}

    return score


def write_samples(samples: list[dict], run_dir: Path, cfg, accelerator, step: int) -> None:
    """An evaluation's generated samples (dicts of one kind, with "step"): appended to generations.jsonl in the run
    dir and, with W&B, logged as the eval/generations table. Main process only."""
    if not (accelerator.is_main_process and samples):
        return
    with (run_dir / "generations.jsonl").open("a") as f:
        f.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    if cfg.logging.backend == "wandb":
        import wandb

        columns = [k for k in samples[0] if k != "step"]
        table = wandb.Table(columns=columns, data=[[s.get(k) for k in columns] for s in samples])
        accelerator.get_tracker("wandb", unwrap=True).log({"eval/generations": table}, step=step)


def text_columns(loaded: Loaded) -> tuple[str, ...]:
    return tuple(loaded.data.get("text_columns") or ("text",))


@torch.no_grad()
def classify(loaded: Loaded, texts: list[tuple[str, ...]], batch_size: int = 8) -> list[dict]:
    """Class probabilities of each row's texts (one per text column: a pair for two), tokenized as the run's
    training data was (data._encode_text, the run's max_length); rows that are longer are cut there, as in training.
    Without the run's max_length (a foreign adapter, a merge), the model's own position limit."""
    from lorafit.data import _encode_text, collate

    columns, model, tok = text_columns(loaded), loaded.model, loaded.tokenizer
    max_length = loaded.data.get("max_length") or min(tok.model_max_length, getattr(model.config, "max_position_embeddings", 1 << 30))
    out, n_cut = [], 0
    for i in range(0, len(texts), batch_size):
        rows = texts[i : i + batch_size]
        batch = {c: [r[j] for r in rows] for j, c in enumerate(columns)} | {"label": [0] * len(rows)}
        enc = _encode_text(batch, columns, tok, max_length, "seq_cls")
        n_cut += sum(enc["truncated"])
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        inputs = collate([{k: enc[k][j] for k in keys} for j in range(len(rows))], tok.pad_token_id)
        probs = model(**{k: v.to(next(model.parameters()).device) for k, v in inputs.items()}).logits.float().softmax(-1).cpu()
        out += [{**dict(zip(columns, r)), "label": loaded.labels[int(p.argmax())],
                 "probs": {l: round(float(v), 4) for l, v in zip(loaded.labels, p)}} for r, p in zip(rows, probs)]
    if n_cut:
        why = "the run's data.max_length" if loaded.data.get("max_length") else "the model's position limit"
        print(f"lorafit: {n_cut} of {len(texts)} texts are longer than {max_length} tokens ({why}) and were cut there",
              file=sys.stderr)
    return out


def _read_prompts(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of each jsonl row, an object each; which fields it needs depends on the model (_texts)."""
    if not path.is_file():
        raise UserError(f"--file {path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--file {path}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"--file {path}, line {n}: not a JSON object")
        rows.append((n, row))
    return rows


def _texts(loaded: Loaded, rows: list[tuple[str, dict]]) -> list:
    """What to feed the model, per (where, row): the conversation's turns (a generator), or the texts in the
    run's text columns (a classifier: a row with those fields, or for one column a prompt row as well)."""
    columns = text_columns(loaded) if loaded.task == "seq_cls" else ()
    out = []
    for where, row in rows:
        if columns and all(isinstance(row.get(c), str) for c in columns):
            out.append(tuple(row[c] for c in columns))
        elif len(columns) > 1:
            example = json.dumps({c: "..." for c in columns})
            raise UserError(f"{where}: this classifier reads sentence pairs ({' + '.join(columns)}, its run's "
                            f"data.text_columns): pass --file rows like {example}")
        elif not any(k in row for k in ("prompt", "text", "messages")):
            fields = [repr(f) for f in dict.fromkeys(columns + ("prompt", "text", "messages"))]
            raise UserError(f"{where}: needs a {', '.join(fields[:-1])} or {fields[-1]} field")
        else:
            turns = _turns(row)
            out.append((turns[-1]["content"],) if columns else turns)
    return out


def _turns(row: dict) -> list[dict]:
    """A row's prompt as turns. A `messages` row that ends with an assistant turn is an SFT row whose last turn is
    the reference reply: the prompt is the conversation before it, as in eval.generate (data.generation_rows)."""
    if "messages" not in row:
        return [{"role": "user", "content": row.get("prompt", row.get("text"))}]
    turns = row["messages"]
    if turns and turns[-1].get("role") == "assistant":
        turns = turns[:-1]
    if not turns:
        raise UserError(f"a 'messages' row has no turn before its assistant reply: {json.dumps(row)[:120]}")
    return turns


def _chat(loaded: Loaded, args) -> None:
    from transformers import TextStreamer

    history: list[dict] = []
    print("chat: an empty line or /exit quits, /reset forgets the conversation", file=sys.stderr)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            break
        if text in ("", "/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = generate(loaded.model, loaded.tokenizer, [prompt_text(loaded.tokenizer, history, args.raw)], args.max_new_tokens,
                         args.temperature, args.top_p, streamer=streamer)[0]
        history.append({"role": "assistant", "content": reply})


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lorafit.generate", description="Generate with (or classify by) a trained model.")
    p.add_argument("path", help="a lorafit run dir, a PEFT adapter dir, or a merged model dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--file", type=Path, help="jsonl of prompts ({'prompt': ...} or {'messages': [...]}, a final assistant turn "
                   "being the reference), batched; a classifier's rows may name its run's text columns (a pair: both)")
    p.add_argument("--out", type=Path, help="with --file: where to write the outputs (jsonl; default: stdout)")
    p.add_argument("--chat", action="store_true", help="an interactive conversation")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as it is (plain-text LMs)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base", help="base model for an adapter (default: the adapter's base_model_name_or_path)")
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (a pickle: only if you trust it)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own Python code (auto_map), only if you trust it; a saved config never does")
    args = p.parse_args(argv)
    if not (args.prompt or args.file or args.chat):
        p.error("give --prompt TEXT, --file prompts.jsonl or --chat")
    if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.batch_size <= 0:
        p.error("--max-new-tokens and --batch-size must be > 0, --temperature >= 0, --top-p in (0, 1]")
    return args


@user_errors_as_one_line
def main(argv=None) -> list[dict]:
    quiet_libraries()
    args = parse_args(argv)
    located = [(f"--prompt {i}", {"prompt": p}) for i, p in enumerate(args.prompt, 1)]
    located += [(f"--file {args.file}, line {n}", r) for n, r in _read_prompts(args.file)] if args.file else []
    rows = [r for _, r in located]
    loaded = load(args.path, args.base, args.allow_pickle, args.trust_remote_code)
    inputs = _texts(loaded, located)
    if loaded.task == "seq_cls":
        if args.chat:
            raise UserError(f"{args.path} is a classifier: pass texts with --prompt or --file, not --chat")
        results = classify(loaded, inputs, args.batch_size)
        for r, texts in zip(results if not args.out else [], inputs):
            print(f"{r['label']}\t" + "  ".join(f"{l}={p:.3f}" for l, p in r["probs"].items()) + f"\t{' | '.join(texts)[:60]}")
    elif args.file:  # batched, not streamed
        prompts = [prompt_text(loaded.tokenizer, turns, args.raw) for turns in inputs]
        outputs = generate(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                           args.batch_size)
        results = [{**r, "output": o} for r, o in zip(rows, outputs)]
        for r in results if not args.out else []:
            print(json.dumps(r, ensure_ascii=False))
    else:
        from transformers import TextStreamer

        results = []
        for r, turns in zip(rows, inputs):  # one at a time, streamed to the terminal as it is generated
            streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
            out = generate(loaded.model, loaded.tokenizer, [prompt_text(loaded.tokenizer, turns, args.raw)], args.max_new_tokens,
                           args.temperature, args.top_p, streamer=streamer)[0]
            results.append({**r, "output": out})
    if args.out:
        args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
        print(f"wrote {len(results)} rows to {args.out}", file=sys.stderr)
    if args.chat:
        _chat(loaded, args)
    return results


if __name__ == "__main__":
    main()
