"""The shipped example model: the README's first command builds it; it must match transformers and write Python."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmc import LLM, SamplingParams

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = EXAMPLES / "stdlib-llama"
PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self"]


@pytest.fixture(scope="module")
def engine(example_engine):
    return example_engine  # 256 tokens a sequence: what these tests generate fits


@pytest.fixture(scope="module")
def reference():
    # The checkpoint is stored in bf16 (half the bytes); the engine and the reference both compute in fp32.
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(MODEL)


def test_example_matches_transformers(engine, reference):
    model, tokenizer = reference
    outputs = LLM(engine).generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0))
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :].tolist()
        assert out.outputs[0].token_ids == expected[: len(out.outputs[0].token_ids)]
        assert len(out.outputs[0].token_ids) == len(expected) or out.outputs[0].finish_reason == "stop"


def test_example_model_has_learned_python(reference):
    """Perplexity on standard-library files it never saw (held out by the training script) is low."""
    spec = importlib.util.spec_from_file_location("train_example_model", EXAMPLES / "train_example_model.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    model, tokenizer = reference
    heldout = [f for f in train.stdlib_files() if train.is_heldout(f)][:4]
    assert heldout, "no held-out standard-library files found"
    losses = []
    for f in heldout:
        ids = tokenizer(f.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :512]
        with torch.no_grad():
            losses.append(model(ids, labels=ids).loss.item())
    perplexity = math.exp(sum(losses) / len(losses))
    # Measured 27.7 (Python 3.11's library); a unigram model fit on these very tokens scores 293.
    assert perplexity < 40, f"held-out perplexity {perplexity:.1f}: the example model has not learned Python"


def test_readme_headline_tp8_pp2(engine, tmp_path):
    """`llmc build examples/stdlib-llama --tp 8 --pp 2` then `llmc generate`: 16 ranks, the tokens of one."""
    from click.testing import CliRunner

    from llmc.cli import main

    sharded = tmp_path / "stdlib-llama-tp8-pp2"
    result = CliRunner().invoke(main, ["build", str(MODEL), "-o", str(sharded), "--tp", "8", "--pp", "2", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    args = ["generate", str(sharded), "--max-tokens", "24", "--json"] + [a for p in PROMPTS for a in ("-p", p)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    got = [json.loads(line)["token_ids"] for line in result.stdout.splitlines() if line.startswith("{")]
    expected = [o.outputs[0].token_ids for o in LLM(engine).generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))]
    assert got == expected
