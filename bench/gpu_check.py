"""The GPU check in one command: `make gpu-check` (or `.venv/bin/python bench/gpu_check.py [--out DIR]`).

On a CUDA machine it runs, each as a fresh process, and writes DIR/gpu_check.json and a markdown table to paste into
bench/RESULTS.md:
  bf16_lora        SFT on SmolLM2-135M, LoRA all-linear, bf16, with the merge hook
  qlora_nf4        the same on an NF4 base (QLoRA, bf16 compute), merged into the dequantized base and verified
  packing_sdpa     the bf16 job with data.packing=true and sdpa attention
  packing_flash    the same with flash_attention_2, when flash-attn is installed (else skipped, and said so)
  accelerate_1gpu  the bf16 job through `accelerate launch --config_file conf/accelerate/single_gpu.yaml`
  throughput       bench/throughput.py job b (lorafit vs HF Trainer + PEFT), one pair
Each lorafit row gives samples/s, tokens/s, MFU, peak GPU memory, the eval perplexity and the merge check.

`--dry-run` runs anywhere: it composes and validates every lorafit command's config (nothing trains), checks that
the files the steps use exist, and prints the commands. The test suite runs it on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS_SFT = ["recipe=sft_jsonl", "train.max_steps=60", "train.eval_every=0", "lora.target_modules=all-linear"]


def steps(data: Path, out: Path) -> dict[str, list[str]]:
    """Step name -> its command line (lorafit steps run `python -m lorafit`)."""
    lorafit = [sys.executable, "-m", "lorafit"]
    sft = [*STEPS_SFT, f"data.train_file={data}", "train.mixed_precision=bf16"]
    return {
        "bf16_lora": [*lorafit, *sft, "hooks=[save_adapter,merge]", f"hydra.run.dir={out / 'bf16_lora'}"],
        "qlora_nf4": [*lorafit, *sft, "quant=nf4", "quant.compute_dtype=bfloat16", "hooks=[save_adapter,merge]",
                      f"hydra.run.dir={out / 'qlora_nf4'}"],
        "packing_sdpa": [*lorafit, *sft, "data.packing=true", "data.group_by_length=false", "model.attn_implementation=sdpa",
                         "hooks=[]", f"hydra.run.dir={out / 'packing_sdpa'}"],
        "packing_flash": [*lorafit, *sft, "data.packing=true", "data.group_by_length=false",
                          "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16", "hooks=[]",
                          f"hydra.run.dir={out / 'packing_flash'}"],
        "accelerate_1gpu": [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                            str(REPO / "conf/accelerate/single_gpu.yaml"), "-m", "lorafit", *sft, "hooks=[]",
                            f"hydra.run.dir={out / 'accelerate_1gpu'}"],
        "throughput": [sys.executable, str(REPO / "bench/throughput.py"), "--jobs", "b", "--modes", "defaults", "--pairs", "1"],
    }


def sft_data(out: Path) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from throughput import sft_files

    return sft_files(out)[0]


def dry_run(out: Path) -> int:
    """Compose and validate every lorafit command (nothing trains) and check the files the steps use."""
    data = out / "sft_train.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    from hydra import compose, initialize_config_dir

    sys.path.insert(0, str(REPO))
    from lorafit.config import CONF_DIR, validate
    from lorafit.errors import UserError

    failed = 0
    for name, cmd in steps(data, out).items():
        if "-m" in cmd and "lorafit" in cmd:
            args = [a for a in cmd[cmd.index("lorafit", cmd.index("-m")) + 1 :] if not a.startswith("hydra.")]
            try:
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    validate(compose(config_name="config", overrides=args))
                ok, detail = True, "config composes and validates"
            except UserError as e:
                ok, detail = False, str(e).replace("\n", " ")
        else:
            ok, detail = Path(cmd[1]).is_file(), "script exists"
        if name == "accelerate_1gpu":
            ok = ok and (REPO / "conf/accelerate/single_gpu.yaml").is_file() and Path(cmd[0]).exists()
        failed += not ok
        print(f"{'ok ' if ok else 'BAD'} {name:16s} {detail}\n    {' '.join(cmd)}")
    return 1 if failed else 0


def run_step(name: str, cmd: list[str], out: Path) -> dict:
    if name == "packing_flash" and importlib.util.find_spec("flash_attn") is None:
        return {"step": name, "status": "skipped: flash-attn is not installed (pip install flash-attn)"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    row = {"step": name, "status": "ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})",
           "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        row["stderr_tail"] = proc.stderr[-2000:]
    summary = out / name / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        row.update(samples_per_s=s["samples_per_s"], tokens_per_s=s["tokens_per_s"], mfu=s["mfu"], precision=s["precision"],
                   perplexity=s["eval"].get("perplexity"), peak_gpu_gib=(s["peak_memory"]["gpu_bytes"] or 0) / 2**30,
                   merge_vs_unmerged=s.get("merge", {}).get("max_abs_diff_merged_vs_unmerged"),
                   merge_vs_trained=s.get("merge", {}).get("max_abs_diff_merged_vs_trained"))
    elif name == "throughput" and proc.returncode == 0:
        row["output"] = proc.stdout[-3000:]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="compose and check every step without training (any machine)")
    args = p.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        sys.exit(dry_run(args.out))
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; `--dry-run` checks the wiring on any machine")
    rows = [run_step(name, cmd, args.out) for name, cmd in steps(sft_data(args.out), args.out).items()]
    device = torch.cuda.get_device_name(0)
    (args.out / "gpu_check.json").write_text(json.dumps({"device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"| step ({device}) | status | samples/s | tokens/s | MFU | peak GPU GiB | perplexity | merge vs trained |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        fmt = lambda k, f: format(r[k], f) if r.get(k) is not None else "–"
        print(f"| {r['step']} | {r['status']} | {fmt('samples_per_s', '.1f')} | {fmt('tokens_per_s', '.0f')} | "
              f"{fmt('mfu', '.1%')} | {fmt('peak_gpu_gib', '.2f')} | {fmt('perplexity', '.3f')} | {fmt('merge_vs_trained', '.2e')} |")
    if any(r["status"].startswith("failed") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
