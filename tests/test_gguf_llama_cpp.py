"""GGUF checked by its real consumer: llama.cpp itself (llama-cpp-python, built from source by `make install`).

For each decoder family the exporter writes (lorafit.export.GGUF_FAMILIES), a short LoRA run's merged model is
exported as f16 and q8_0; llama.cpp must tokenize a text as the HF tokenizer does, give the merged HF model's
logits on it (relative to the largest logit: 1e-2 for f16, 6e-2 for q8_0), and render the chat template as the
tokenizer does for SFT. The text is longer than twice the tiny models' sliding window (16), so Gemma's local
layers are exercised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLS_EVAL, CLS_TRAIN, run_cli, run_inprocess

LORA_FAMILIES = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"]
FAMILIES = LORA_FAMILIES + ["tiny-qwen3-moe"]  # a GGUF LoRA carries Linear factors only: an MoE's adapter is merged
# q8_0: llama.cpp quantizes the activations to 8 bits too (its q8_0 x q8_0 dot products), not just the weights;
# measured 2026-12-04 on the tiny families (64 tokens): q8_0 2.0-4.3% (Qwen2 the most), f16 0.07-0.16%.
BOUNDS = {"f16": 1e-2, "q8_0": 6e-2}
TEXT = ("Shares in the bank rose after profits beat forecasts, while the striker scored twice in the final and the "
        "software maker said its new chip would ship in phones next year; the market was calm.")


@pytest.fixture(scope="module")
def merged_dirs(tmp_path_factory):
    """family -> its merged dir holding model-f16.gguf (the merge hook) and model-q8_0.gguf (lorafit.merge)."""
    from lorafit import merge

    done = {}

    def get(name: str):
        if name not in done:
            root = tmp_path_factory.mktemp(name)
            run_dir, summary = run_inprocess(root, f"model={name}", "train.mixed_precision=no", "data=files",
                                             f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}",
                                             "data.max_length=48", "lora.target_modules=all-linear", "train.lr=1e-2",
                                             "train.max_steps=4", "train.eval_every=0", "hooks=[save_adapter,merge]",
                                             "hooks.merge.gguf=f16")
            assert summary["merge"]["gguf"]["type"] == "f16"
            merge.main([str(run_dir), "--out", str(root / "q8"), "--gguf", "q8_0"])
            (run_dir / "merged" / "model-q8_0.gguf").symlink_to(root / "q8" / "model-q8_0.gguf")
            done[name] = run_dir / "merged"
        return done[name]

    return get


def llama_cpp_logits(path, ids: list[int]) -> tuple[np.ndarray, list[int], dict]:
    """llama.cpp's logits for `ids`, its own tokenization of TEXT (BOS as the file says), and the file's metadata."""
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        own = llm.tokenize(TEXT.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                           special=False)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)]), own, dict(llm.metadata)
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", list(BOUNDS))
@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_runs_the_gguf_as_the_merged_model(name, qtype, merged_dirs):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = merged_dirs(name)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 2 * 16
    got, own, meta = llama_cpp_logits(merged / f"model-{qtype}.gguf", ids)
    assert own == ids  # llama.cpp's tokenizer: the same ids, BOS included
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(got - ref).max(axis=1) / np.abs(ref).max()  # per position
    if name == "tiny-qwen3-moe" and qtype == "q8_0":  # on the untrained base: 0.149 at 1 of 38 positions, <= 0.045 elsewhere; merged: 0.015
        assert np.median(err) <= BOUNDS[qtype] / 2 and (err > BOUNDS[qtype]).mean() <= 0.1  # a top-k routing flip
    else:
        assert err.max() <= BOUNDS[qtype]
    messages = [{"role": "user", "content": "Which topic?"}, {"role": "assistant", "content": "sport"},
                {"role": "user", "content": "And this one?"}]
    rendered = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=tok.eos_token, bos_token=tok.bos_token)
    assert rendered(messages=messages).prompt == tok.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


@pytest.mark.slow
def test_gguf_refuses_an_moe_llama_cpp_would_route_otherwise(tmp_path, merged_dirs, capsys):
    """llama.cpp's qwen3moe graph renormalizes the top-k routing weights: a Qwen3-MoE that does not is refused, as
    is a GGUF LoRA of an adapter on the experts (llama.cpp's --lora applies Linear factors here)."""
    import json
    import shutil

    from lorafit import export
    from lorafit.errors import UserError
    from lorafit.export import to_gguf
    from lorafit.models import resolve

    shutil.copytree(resolve("tiny-qwen3-moe"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    with pytest.raises(UserError, match="norm_topk_prob false.*convert_hf_to_gguf.py"):
        to_gguf(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.gguf")) and not list((tmp_path / "m").glob(".*.tmp"))
    with pytest.raises(SystemExit):
        export.main([str(merged_dirs("tiny-qwen3-moe").parent), "--out", str(tmp_path / "a.gguf")])
    assert "experts" in capsys.readouterr().err.splitlines()[-1] and not (tmp_path / "a.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", LORA_FAMILIES)
def test_llama_cpp_applies_the_gguf_lora_over_the_base_gguf(name, merged_dirs, tmp_path):
    """`lorafit.export RUN` and `lorafit.export BASE_DIR`: llama.cpp with `--lora` gives the merged model's logits,
    and the adapter moves them by more than the bound (it is applied, not ignored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit import export
    from lorafit.models import resolve

    merged = merged_dirs(name)
    export.main([resolve(name), "--out", str(tmp_path / "base.gguf")])
    report = export.main([str(merged.parent), "--out", str(tmp_path / "adapter.gguf")])
    assert report["modules"] > 0
    ids = AutoTokenizer.from_pretrained(merged)(TEXT)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor([ids])).logits[0].numpy()
    base, _, _ = llama_cpp_logits(tmp_path / "base.gguf", ids)
    got = _llama_cpp_lora_logits(tmp_path / "base.gguf", tmp_path / "adapter.gguf", ids)
    scale = np.abs(ref).max()
    assert np.abs(base - ref).max() / scale > 5 * BOUNDS["f16"]
    assert np.abs(got - ref).max() / scale <= BOUNDS["f16"]


def test_export_refuses_to_overwrite(tmp_path):
    from lorafit import export
    from lorafit.models import resolve

    out = tmp_path / "x.gguf"
    out.write_text("mine")
    with pytest.raises(SystemExit):
        export.main([resolve("tiny-llama"), "--out", str(out)])
    assert out.read_text() == "mine"


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(tmp_path, capsys):
    """A classifier's adapter trains its head in full (modules_to_save): a GGUF LoRA cannot carry it, so it is refused
    in one line and nothing is written."""
    from lorafit import export

    run_dir, _ = run_inprocess(tmp_path, "model=tiny-llama", "model.task=seq_cls", "train.mixed_precision=no", "data=files",
                               f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}", "data.max_length=32",
                               "lora.target_modules=[q_proj,v_proj]", "train.max_steps=1", "train.eval_every=0", "hooks=[save_adapter]")
    with pytest.raises(SystemExit):
        export.main([str(run_dir), "--out", str(tmp_path / "a.gguf")])
    assert "score" in capsys.readouterr().err.splitlines()[-1]  # the head it would drop
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def _llama_cpp_lora_logits(base, adapter, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(base), lora_path=str(adapter), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


@pytest.mark.slow
def test_a_gguf_base_trains_end_to_end_to_gguf(tmp_path):
    """model.name=FILE.gguf, as a user's downloaded Qwen2 GGUF is: transformers' reader converts it once (into the
    cache), SFT trains on it, the merge is verified and written as GGUF, and llama.cpp runs that file as the merged
    model, and the run's GGUF LoRA over the user's own base file as well. A GGUF the reader gets wrong is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit import export
    from lorafit.models import resolve

    base = tmp_path / "qwen2-base-f16.gguf"
    export.main([resolve("tiny-qwen2"), "--out", str(base)])
    cache, run = {"LORAFIT_CACHE": str(tmp_path / "cache")}, tmp_path / "run"
    out = run_cli("model=tiny-qwen2", f"model.name={base}", "train.mixed_precision=no", "data=files",
                  f"data.train_file={CLS_TRAIN}", f"data.eval_file={CLS_EVAL}", "data.max_length=48",
                  "lora.target_modules=all-linear", "train.lr=1e-2", "train.max_steps=4", "train.eval_every=0",
                  "hooks=[save_adapter,merge]", "hooks.merge.gguf=f16", f"hydra.run.dir={run}", env=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "models").glob("gguf-qwen2-base-f16-*/model.safetensors"))) == 1
    merged = run / "merged"
    ids = AutoTokenizer.from_pretrained(merged)(TEXT)["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor([ids])).logits[0].numpy()
    got, own, meta = llama_cpp_logits(merged / "model-f16.gguf", ids)
    assert own == ids and meta["general.architecture"] == "qwen2"
    assert np.abs(got - ref).max() / np.abs(ref).max() <= BOUNDS["f16"]
    export.main([str(run), "--out", str(tmp_path / "adapter.gguf")])
    got = _llama_cpp_lora_logits(base, tmp_path / "adapter.gguf", ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= BOUNDS["f16"]

    gemma = tmp_path / "gemma2.gguf"
    export.main([resolve("tiny-gemma2"), "--out", str(gemma)])
    out = run_cli("model=tiny-gemma2", f"model.name={gemma}", "train.max_steps=1", f"hydra.run.dir={tmp_path / 'g'}",
                  env=cache)
    assert out.returncode == 2 and "architecture 'gemma2', which transformers' GGUF reader does not load exactly" \
        in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
