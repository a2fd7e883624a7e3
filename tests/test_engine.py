"""The engine directory: round trip through a fresh process, and damage reported by file name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import llmc
from llmc import LLM, SamplingParams
from llmc.engine import EngineConfig, EngineError
from llmc.frontend.checkpoint import CheckpointError
from llmc.passes import PIPELINE

PROMPTS = ["def fib(n):", "import os", "class A:\n    pass"]


@pytest.fixture(scope="module")
def engine(llama_engine):
    return llama_engine


@pytest.fixture
def engine_copy(llama_engine_copy):
    return llama_engine_copy


def test_engine_layout(engine):
    config = EngineConfig.load(engine)
    assert {"rank0/program.json", "rank0/weights.safetensors", "tokenizer/tokenizer.json"} <= set(config.files)
    assert config.architecture == "LlamaForCausalLM" and config.mapping == {"tp": 1, "pp": 1, "pp_layers": [2]}
    assert [p["pass"] for p in config.passes + config.ranks[0]["passes"]] == list(PIPELINE)
    assert config.kv_cache == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32", "block_size": 16}
    program = json.loads((engine / "rank0/program.json").read_text())
    targets = {n["target"] for n in program["nodes"]}
    assert "llmc.paged_attention.default" in targets
    assert "aten.scaled_dot_product_attention.default" not in targets


def test_round_trip_in_fresh_process(engine):
    params = SamplingParams(max_tokens=12, temperature=0)
    here = [o.outputs[0].token_ids for o in LLM(engine).generate(PROMPTS, params)]
    code = (
        "import json, sys; from llmc import LLM, SamplingParams; "
        f"outs = LLM(sys.argv[1]).generate({PROMPTS!r}, SamplingParams(max_tokens=12, temperature=0)); "
        "compiler = [m for m in sys.modules if m.startswith(('llmc.frontend', 'llmc.passes'))]; "
        "print(json.dumps([[o.outputs[0].token_ids for o in outs], compiler]))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(engine)], capture_output=True, text=True, check=True)
    tokens, compiler_modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert tokens == here
    assert compiler_modules == []  # serving an engine needs neither the frontend nor the passes


def test_rebuild_over_an_engine_needs_force_and_replaces_it(engine, checkpoints, tmp_path):
    out = shutil.copytree(engine, tmp_path / "engine")
    with pytest.raises(FileExistsError, match="already holds an engine; give --force"):
        llmc.build(checkpoints["qwen2"], out, max_seq_len=64, log=lambda _: None)
    llmc.build(checkpoints["qwen2"], out, max_seq_len=64, force=True, log=lambda _: None)
    assert EngineConfig.load(out).architecture == "Qwen2ForCausalLM"
    LLM(out)  # its file list matches what is on disk


def test_altered_weights_are_named(engine_copy):
    weights = engine_copy / "rank0/weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"weights\.safetensors was altered"):
        LLM(engine_copy)


def test_truncated_program_is_named(engine_copy):
    program = engine_copy / "rank0/program.json"
    program.write_bytes(program.read_bytes()[:100])
    with pytest.raises(EngineError, match=r"program\.json has 100 bytes.*truncated"):
        LLM(engine_copy)


def test_missing_tokenizer_is_named(engine_copy):
    (engine_copy / "tokenizer/tokenizer.json").unlink()
    with pytest.raises(EngineError, match=r"tokenizer\.json is missing"):
        LLM(engine_copy)


def test_corrupt_config_is_named(engine_copy):
    """LLM takes an engine or a checkpoint: a config.json that is neither is named as such."""
    (engine_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json: .*not a valid JSON"):
        LLM(engine_copy)


def test_not_an_engine(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json: is it a Hugging Face model directory"):
        LLM(tmp_path)


def test_program_with_forbidden_op_is_refused(engine_copy):
    """Even with matching checksums, a program can only call allow-listed ops."""
    program = engine_copy / "rank0/program.json"
    graph = json.loads(program.read_text())
    graph["nodes"][-2]["target"] = "builtins.eval"
    program.write_text(json.dumps(graph))
    config = EngineConfig.load(engine_copy)
    from llmc.engine import record_files

    record_files(engine_copy, config)
    config.save(engine_copy)
    with pytest.raises(EngineError, match="builtins.eval.*not allowed"):
        LLM(engine_copy)
