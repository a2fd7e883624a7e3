"""The registry sweep (llmc/sweep.py): every causal LM of transformers either matches `generate` token for
token in fp32 or is refused at build time with a one-line llmc error; none builds and differs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import llmc
from llmc import sweep
from llmc.compiler import BUILD_ERRORS
from llmc.frontend.checkpoint import CheckpointError

DOC = Path(__file__).parent.parent / "docs" / "architectures.md"


def _case(model_type: str):
    gap = sweep.TINY_CONFIG_GAPS.get(model_type)
    return pytest.param(model_type, marks=pytest.mark.xfail(strict=True, reason=f"tiny config: {gap}")) if gap else model_type


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [_case(t) for t in sweep.model_types()])
def test_matches_transformers_or_is_refused_in_one_line(model_type, tmp_path):
    result = sweep.check(model_type, tmp_path)
    assert result.ok, f"{model_type} ({result.architecture}) {result.status}: {result.detail}"


def test_tiny_config_shrinks_through_each_configs_own_names():
    gpt2 = sweep.tiny_config("gpt2")  # n_embd, n_layer, n_head through GPT2Config.attribute_map
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.vocab_size) == (64, 2, 4, sweep.VOCAB)
    qwen3_moe = sweep.tiny_config("qwen3_moe")
    assert (qwen3_moe.num_experts, qwen3_moe.num_experts_per_tok, qwen3_moe.moe_intermediate_size) == (4, 2, 64)
    assert qwen3_moe.num_key_value_heads < qwen3_moe.num_attention_heads  # grouped-query attention kept
    deepseek = sweep.tiny_config("deepseek_v3")
    assert deepseek.head_dim == deepseek.qk_rope_head_dim == 8 and deepseek.kv_lora_rank == 32


def test_skips_and_gaps_are_registry_entries():
    assert set(sweep.SKIPPED) | set(sweep.TINY_CONFIG_GAPS) <= set(sweep.model_types())
    assert not set(sweep.SKIPPED) & set(sweep.TINY_CONFIG_GAPS)


def test_dynamic_rope_is_refused_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=sweep.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    sweep._tokenizer().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError) as e:
        llmc.build(tmp_path / "ckpt", tmp_path / "engine", max_seq_len=32, log=lambda _: None)
    assert "\n" not in str(e.value)
    assert re.search(r"LlamaForCausalLM \(rope_type 'dynamic'\).*branches on the values of its inputs", str(e.value))


def test_a_program_the_loader_would_refuse_is_a_build_error(tmp_path):
    # BART's decoder computes positions as arange(number of tokens): an op no llmc pass lowers, so no engine is written.
    sweep.make_checkpoint("bart", tmp_path / "ckpt")
    with pytest.raises(BUILD_ERRORS, match=r"^BartForCausalLM is not supported yet: its program calls aten\.arange\.default") as e:
        llmc.build(tmp_path / "ckpt", tmp_path / "engine", max_seq_len=32, log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_generated_table_lists_the_registry():
    rows = re.findall(r"^\| (\S+) \| \S+ \| (\w[\w -]*) \|", DOC.read_text(), flags=re.M)
    assert [t for t, _ in rows if t != "model_type"] == sweep.model_types(), "regenerate: python -m llmc.sweep --write docs/architectures.md"
