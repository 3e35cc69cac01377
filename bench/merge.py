"""Benchmark: streaming merge vs peft merge_and_unload on a ~1.5 GB sharded bf16 checkpoint.

Builds (once, under --work) a random Llama-shaped model (12 layers, hidden 2048, 748M params, bf16, 4 shards)
and a random LoRA adapter on all linear layers (r=16). Each method runs in a fresh subprocess that reports its own
peak RSS, so numbers are not polluted by the others:
  io        read every shard and write it back unchanged (the floor for any merge)
  stream    python -m lorafit.merge ADAPTER --base BASE --stream
  peft      load the whole model, PeftModel.from_pretrained, merge_and_unload, save_pretrained
  baseline  the interpreter with torch + transformers + peft imported (subtracted from the RSS figures)

    .venv/bin/python bench/merge.py [--work /tmp/lorafit-bench-merge]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork+exec, the former is this process's own.
RSS = ("import json, re; hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
       "print('RESULT', json.dumps({'rss_mb': hwm / 1024}))")
SCRIPTS = {
    "baseline": "import torch, transformers, peft, safetensors\n" + RSS,
    "io": """
import sys, torch, transformers, peft
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out = Path(sys.argv[1]), Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
for shard in sorted(base.glob('*.safetensors')):
    with safe_open(shard, 'pt') as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    save_file(tensors, out / shard.name, metadata={'format': 'pt'}); del tensors
""" + RSS,
    "stream": """
import sys, torch, transformers, peft
from lorafit.merge import main
main([sys.argv[2], '--base', sys.argv[1], '--out', sys.argv[3], '--stream'])
""" + RSS,
    "peft": """
import sys, torch, transformers, peft
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size='400MB')
""" + RSS,
}


def build(work: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="400MB")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    return base, adapter


def run(name: str, base: Path, adapter: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SCRIPTS[name], str(base), str(adapter), str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT")).split(" ", 1)[1])
    return {**result, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/lorafit-bench-merge")
    args = p.parse_args()
    work = Path(args.work)
    base, adapter = build(work)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards) / 2**20
    total = sum(s.stat().st_size for s in shards) / 2**20
    res = {name: run(name, base, adapter, work / f"out-{name}") for name in ("baseline", "io", "stream", "peft")}
    b = res["baseline"]["rss_mb"]
    print(f"checkpoint: {total:,.0f} MiB in {len(shards)} shards, largest {largest:,.0f} MiB; interpreter baseline {b:,.0f} MiB")
    print(f"{'method':<8}{'wall s':>9}{'peak RSS MiB':>15}{'RSS - baseline':>16}{'vs largest shard':>18}")
    for name in ("io", "stream", "peft"):
        r = res[name]
        print(f"{name:<8}{r['wall_s']:>9.1f}{r['rss_mb']:>15,.0f}{r['rss_mb'] - b:>16,.0f}{(r['rss_mb'] - b) / largest:>17.2f}x")
    print(f"stream/io time: {res['stream']['wall_s'] / res['io']['wall_s']:.2f}x   "
          f"peft/stream peak RSS above baseline: {(res['peft']['rss_mb'] - b) / (res['stream']['rss_mb'] - b):.1f}x   "
          f"peft/stream time: {res['peft']['wall_s'] / res['stream']['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
