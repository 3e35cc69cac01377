"""Merge an adapter into its base and prove the merge is exact.

The merge always goes into a *float* copy of the base (dtype fp32 by default), never into quantized
weights: adding s·B·A to 4-bit weights and re-quantizing changes the function (peft#2321, transformers#31293).
Verification runs three models on one probe batch and records the max abs logit difference:
  merged vs unmerged (same float base + adapter): must be ~0 -- the merge itself is exact;
  merged vs the model that was trained (only differs from the above when that base was quantized):
  what deploying the float merge costs against the adapter-on-quantized-base the user evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lorafit.config import UserError

MERGE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}  # max abs logit diff, relative to the logits' scale


@torch.no_grad()
def logits(model, probe: dict) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in probe.items() if k != "labels"}).logits.float().cpu()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def merge_and_verify(base_model, adapter_dir: Path, out_dir: Path, probe: dict, dtype: str = "fp32",
                     tokenizer=None, reference=None) -> dict:
    """Load adapter_dir onto base_model (float), merge, verify on `probe`, save atomically to out_dir."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    unmerged = logits(peft_model, probe)
    merged_model = peft_model.merge_and_unload()
    merged = logits(merged_model, probe)
    scale = max(1.0, float(unmerged.abs().max()))
    report = {"dtype": dtype, "probe_rows": int(len(unmerged)), "logit_scale": scale,
              "max_abs_diff_merged_vs_unmerged": max_diff(merged, unmerged), "tolerance": TOLERANCE[dtype] * scale}
    if reference is not None:
        report["max_abs_diff_merged_vs_trained"] = max_diff(merged, logits(reference, probe))
    if report["max_abs_diff_merged_vs_unmerged"] > report["tolerance"]:
        raise UserError(f"merge check failed: merged and unmerged logits differ by "
                        f"{report['max_abs_diff_merged_vs_unmerged']:.3g} > {report['tolerance']:.3g}; nothing was saved")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged_model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return report
