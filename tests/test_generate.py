"""`python -m lorafit.generate`: the adapter and its merged model generate the same tokens; classifiers classify."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, TINY_CLS, run_inprocess

from lorafit.generate import generate, load, prompt_text

PROMPTS = ["What is the market doing?", "Who scored the goal?", "Tell me about the new phone chip."]


def generate_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafit.generate", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rows = [{"prompt": f"Topic {i % 3}: {w}?", "response": f"The {w} {'rose fell'.split()[i % 2]} today."}
            for i, w in enumerate(["market", "goal", "chip", "bank", "striker", "phone"] * 8)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir, _ = run_inprocess(root, "model=tiny-llama", "data=sft", f"data.train_file={root / 'sft.jsonl'}",
                               "train.mixed_precision=no", "train.batch_size=4", "train.max_steps=12", "train.lr=3e-2",
                               "lora.target_modules=all-linear", "hooks=[save_adapter,merge]")
    return run_dir


def test_adapter_and_merged_model_generate_the_same_tokens(sft_run):
    adapter, merged = load(sft_run), load(sft_run / "merged")
    prompts = [prompt_text(adapter.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert prompts[0].endswith("<|assistant|>\n")  # the chat template's generation prompt, as in SFT training
    ids = lambda loaded: [loaded.tokenizer(o, add_special_tokens=False)["input_ids"]
                          for o in generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=16, batch_size=2)]
    from_adapter, from_merged = ids(adapter), ids(merged)
    assert from_adapter == from_merged and any(from_adapter)
    with adapter.model.disable_adapter():  # the adapter is really in play: the base alone says something else
        assert ids(adapter) != from_adapter
    # Left padding: a prompt generated alone gives what it gave inside a batch of other lengths.
    n = [len(adapter.tokenizer(p)["input_ids"]) for p in prompts[:2]]
    short = n.index(min(n))
    assert n[0] != n[1]  # the first batch of two is padded
    alone = generate(adapter.model, adapter.tokenizer, [prompts[short]], max_new_tokens=16)
    assert adapter.tokenizer(alone[0], add_special_tokens=False)["input_ids"] == from_adapter[short]


def test_generate_cli_file_prompt_and_chat(sft_run, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = generate_cli(sft_run, "--file", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl", "--max-new-tokens", 16)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all("output" in r for r in rows)

    streamed = generate_cli(sft_run / "merged", "--prompt", PROMPTS[0], "--max-new-tokens", 16)
    assert streamed.returncode == 0, streamed.stderr
    assert rows[0]["output"].strip() and rows[0]["output"].strip() in streamed.stdout  # TextStreamer printed it

    chat = generate_cli(sft_run, "--chat", "--max-new-tokens", 8, stdin=f"{PROMPTS[0]}\n/reset\n{PROMPTS[1]}\n\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2


def test_generate_cli_classifies_with_a_seq_cls_run(tmp_path):
    """Every held-out row through the CLI (the adapter put back on its base): the printed labels score exactly the
    accuracy the run measured on the trained model."""
    import csv

    from conftest import CLS_EVAL

    run_dir, summary = run_inprocess(tmp_path, *TINY_CLS, "train.max_steps=40", "hooks=[save_adapter]")
    rows = list(csv.DictReader(open(CLS_EVAL)))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    out = generate_cli(run_dir, "--file", tmp_path / "p.jsonl", "--out", tmp_path / "o.jsonl")
    assert out.returncode == 0, out.stderr
    got = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sum(g["label"] == r["label"] for g, r in zip(got, rows)) / len(rows) == summary["eval"]["accuracy"] > 0.9
    assert set(got[0]["probs"]) == {"business", "sport", "tech"} and abs(sum(got[0]["probs"].values()) - 1) < 1e-3
    printed = generate_cli(run_dir, "--prompt", rows[0]["text"])
    assert printed.stdout.split("\t")[0] == got[0]["label"] and "business=" in printed.stdout


def test_generate_cli_bad_input_is_one_line(tmp_path, sft_run):
    for args, message in [((tmp_path / "nope", "--prompt", "x"), "no such adapter dir"),
                          ((sft_run, "--file", tmp_path / "missing.jsonl"), "missing.jsonl: file not found")]:
        out = generate_cli(*args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    out = generate_cli(sft_run, "--file", tmp_path / "bad.jsonl")
    assert out.returncode == 2 and "line 1: needs a 'prompt', 'text' or 'messages' field" in out.stderr


def test_a_qlora_adapter_is_put_back_on_its_4bit_base(tmp_path):
    import bitsandbytes as bnb
    from conftest import TINY_LM

    run_dir, _ = run_inprocess(tmp_path, *TINY_LM, "quant=nf4", "train.max_steps=2", "hooks=[save_adapter]")
    loaded = load(run_dir)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()) > 0
    assert generate(loaded.model, loaded.tokenizer, [PROMPTS[0]], max_new_tokens=4)  # and it generates
