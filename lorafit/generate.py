"""Try a trained model: generate (causal LM) or classify (seq_cls) from a run dir, an adapter dir or a merged dir.

`python -m lorafit.generate PATH [--prompt TEXT ...] [--file prompts.jsonl --out outputs.jsonl] [--chat]
 [--max-new-tokens N] [--temperature T] [--top-p P] [--base MODEL]`

An adapter is put back on the very base it trained on (lorafit.json: QLoRA bases are re-quantized as trained);
a merged dir loads alone. Prompts go through the model's chat template where it has one, as in training; greedy
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
from lorafit.errors import UserError


@dataclass
class Loaded:
    model: object
    tokenizer: object
    task: str  # seq_cls | causal_lm
    labels: list[str] | None


def load(path: str | Path, base: str | None = None, allow_pickle: bool = False) -> Loaded:
    """The model at `path` (merged dir, adapter dir, or run dir holding adapter/), in eval mode."""
    from omegaconf import OmegaConf

    from lorafit.saved import base_name, run_config, saved_tokenizer
    from lorafit.analysis.spectrum import ADAPTER_CONFIG, adapter_dir, read_adapter
    from lorafit.config import ModelConfig
    from lorafit.models import auto_class, build_model, build_tokenizer, load_config

    path = Path(path)
    if (path / "config.json").is_file() and not (adapter_dir(path) / ADAPTER_CONFIG).is_file():  # a merged model
        cfg_model = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": str(path)})
        arch = " ".join(load_config(cfg_model).architectures or [])
        task = "seq_cls" if "ForSequenceClassification" in arch else "causal_lm"
        model = auto_class(task).from_pretrained(path, use_safetensors=True)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if task == "seq_cls" else None
        return Loaded(model.eval(), build_tokenizer(cfg_model), task, labels)
    from peft import PeftModel

    adir = adapter_dir(path)
    config, state = read_adapter(adir, allow_pickle=allow_pickle)  # one clear line for a missing or corrupt adapter
    base = base_name(adir, config, base)
    cfg, info = run_config(adir, state, config, base)
    tokenizer = saved_tokenizer(cfg.model, adir)
    if tokenizer is None:
        raise UserError(f"no tokenizer beside {adir} or with the base {base!r}: generation needs one")
    model = PeftModel.from_pretrained(build_model(cfg, info.get("labels")), adir)
    return Loaded(model.eval(), tokenizer, info["task"], info.get("labels"))


def prompt_text(tokenizer, turns: list[dict], raw: bool = False) -> str:
    """What the model sees before its reply: the chat template with the assistant header, as in SFT training,
    or (no template) lorafit's plain `role: content` lines, the format `data._sft_segments` trains on.
    raw: the last turn's text as it is, for a model trained on plain text (data=files)."""
    if raw:
        return (tokenizer.bos_token or "") + turns[-1]["content"]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


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
        samples = [{"step": step, "prompt": p, "reference": r["reference"], "output": o}
                   for p, r, o in zip(prompts, rows, outputs)]
        with (run_dir / "generations.jsonl").open("a") as f:
            f.write("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        if cfg.logging.backend == "wandb":
            import wandb

            table = wandb.Table(columns=["prompt", "reference", "output"],
                                data=[[s["prompt"], s["reference"], s["output"]] for s in samples])
            accelerator.get_tracker("wandb", unwrap=True).log({"eval/generations": table}, step=step)
        return {f"gen_{k}": v for k, v in metrics.generation(outputs, [r["reference"] for r in rows]).items()}

    return score


@torch.no_grad()
def classify(loaded: Loaded, texts: list[str]) -> list[dict]:
    enc = loaded.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    probs = loaded.model(**enc.to(next(loaded.model.parameters()).device)).logits.float().softmax(-1).cpu()
    return [{"text": t, "label": loaded.labels[int(p.argmax())],
             "probs": {l: round(float(v), 4) for l, v in zip(loaded.labels, p)}} for t, p in zip(texts, probs)]


def _read_prompts(path: Path) -> list[dict]:
    """jsonl rows with `prompt` (or `text`), or `messages`; one clear line for anything else."""
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
        if not isinstance(row, dict) or not any(k in row for k in ("prompt", "text", "messages")):
            raise UserError(f"--file {path}, line {n}: needs a 'prompt', 'text' or 'messages' field")
        rows.append(row)
    return rows


def _turns(row: dict) -> list[dict]:
    return row["messages"] if "messages" in row else [{"role": "user", "content": row.get("prompt", row.get("text"))}]


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
    p.add_argument("--file", type=Path, help="jsonl of prompts ({'prompt': ...} or {'messages': [...]}), batched")
    p.add_argument("--out", type=Path, help="with --file: where to write the outputs (jsonl; default: stdout)")
    p.add_argument("--chat", action="store_true", help="an interactive conversation")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as it is (plain-text LMs)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--base", help="base model for an adapter (default: the adapter's base_model_name_or_path)")
    p.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (a pickle: only if you trust it)")
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
    rows = [{"prompt": p} for p in args.prompt] + (_read_prompts(args.file) if args.file else [])
    loaded = load(args.path, args.base, args.allow_pickle)
    if loaded.task == "seq_cls":
        if args.chat:
            raise UserError(f"{args.path} is a classifier: pass texts with --prompt or --file, not --chat")
        results = classify(loaded, [_turns(r)[-1]["content"] for r in rows])
        for r in results if not args.out else []:
            print(f"{r['label']}\t" + "  ".join(f"{l}={p:.3f}" for l, p in r["probs"].items()) + f"\t{r['text'][:60]}")
    elif args.file:  # batched, not streamed
        prompts = [prompt_text(loaded.tokenizer, _turns(r), args.raw) for r in rows]
        outputs = generate(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p,
                           args.batch_size)
        results = [{**r, "output": o} for r, o in zip(rows, outputs)]
        for r in results if not args.out else []:
            print(json.dumps(r, ensure_ascii=False))
    else:
        from transformers import TextStreamer

        results = []
        for r in rows:  # one at a time, streamed to the terminal as it is generated
            streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
            out = generate(loaded.model, loaded.tokenizer, [prompt_text(loaded.tokenizer, _turns(r), args.raw)], args.max_new_tokens,
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
