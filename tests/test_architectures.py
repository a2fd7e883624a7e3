"""The registry sweep (llmc/sweep.py): every causal LM of transformers either matches `generate` token for
token in fp32 or is refused at build time with a one-line llmc error; none builds and differs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import llmc
from llmc import sweep
from llmc.compiler import BUILD_ERRORS

DOC = Path(__file__).parent.parent / "docs" / "architectures.md"


def documented(status: str) -> list[str]:
    """The registry entries docs/architectures.md gives this status."""
    return [t for t, s in re.findall(r"^\| (\S+) \| \S+ \| (\w[\w -]*) \|", DOC.read_text(), flags=re.M) if s == status]


# Registry entries that build the same model class from the same tiny config as another entry (only numbers
# such as RoPE's theta or the norm's epsilon differ): checking them again runs the same program.
SAME_PROGRAM_AS = {"gpt-sw3": "gpt2", "internlm3": "exaone", "iquestcoder": "exaone"}
NUMBERS_ONLY = {"model_type", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "transformers_version"}


# CI re-checks every architecture the table says matches (a change that breaks one fails here), but those of
# SAME_PROGRAM_AS; the whole registry, refusals included, is `python -m llmc.sweep --write docs/architectures.md`
# (about 10 minutes on 2 cores, too long for every CI run), whose table test_generated_table_lists_the_registry
# keeps complete.
@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in documented("matches") if t not in SAME_PROGRAM_AS])
def test_documented_matches_still_match_transformers(model_type, tmp_path):
    result = sweep.check(model_type, tmp_path)
    assert result.status == "matches", f"{model_type} ({result.architecture}) {result.status}: {result.detail}"


@pytest.mark.parametrize("model_type, same_as", SAME_PROGRAM_AS.items())
def test_entries_not_rechecked_are_the_same_program(model_type, same_as):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CLASSES

    assert {model_type, same_as} <= set(documented("matches"))
    assert CLASSES[model_type] == CLASSES[same_as]
    config, other = (sweep.tiny_config(t).to_dict() for t in (model_type, same_as))
    assert {k: v for k, v in config.items() if k not in NUMBERS_ONLY} == {k: v for k, v in other.items() if k not in NUMBERS_ONLY}


def test_tiny_config_shrinks_through_each_configs_own_names():
    gpt2 = sweep.tiny_config("gpt2")  # n_embd, n_layer, n_head through GPT2Config.attribute_map
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.vocab_size) == (64, 2, 4, sweep.VOCAB)
    qwen3_moe = sweep.tiny_config("qwen3_moe")
    assert (qwen3_moe.num_experts, qwen3_moe.num_experts_per_tok, qwen3_moe.moe_intermediate_size) == (4, 2, 64)
    assert qwen3_moe.num_key_value_heads < qwen3_moe.num_attention_heads  # grouped-query attention kept
    deepseek = sweep.tiny_config("deepseek_v3")
    assert deepseek.head_dim == deepseek.qk_rope_head_dim == 8 and deepseek.kv_lora_rank == 32
    qwen3_5 = sweep.tiny_config("qwen3_5")  # vision-language: its text sub-config (the causal LM) shrinks
    assert qwen3_5.text_config.hidden_size == 64 and "full_attention" in qwen3_5.text_config.layer_types
    jamba = sweep.tiny_config("jamba")  # a hybrid's 2 layers keep an attention layer (sweep.OVERRIDES)
    assert jamba.num_hidden_layers == 2 and "attention" in jamba.layers_block_type


def test_only_the_sweeps_own_gaps_crash():
    # A crash outside TINY_CONFIG_GAPS (a tiny config transformers itself cannot run) is an llmc bug, as is a difference.
    assert sorted(documented("crashed")) == sorted(sweep.TINY_CONFIG_GAPS)
    assert not documented("differs") and not documented("multi-line error")


def test_skips_and_gaps_are_registry_entries():
    assert set(sweep.SKIPPED) | set(sweep.TINY_CONFIG_GAPS) <= set(sweep.model_types())
    assert not set(sweep.SKIPPED) & set(sweep.TINY_CONFIG_GAPS)


def test_a_program_the_loader_would_refuse_is_a_build_error(tmp_path):
    # CTRL scales its embeddings in place (mul_): an op engines do not run yet, so no engine is written.
    sweep.make_checkpoint("ctrl", tmp_path / "ckpt")
    with pytest.raises(BUILD_ERRORS, match=r"^CTRLLMHeadModel is not supported yet: its program calls aten\.mul_\.Tensor") as e:
        llmc.build(tmp_path / "ckpt", tmp_path / "engine", max_seq_len=32, log=lambda _: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "engine").exists()


def test_generated_table_lists_the_registry():
    rows = re.findall(r"^\| (\S+) \| \S+ \| (\w[\w -]*) \|", DOC.read_text(), flags=re.M)
    assert [t for t, _ in rows if t != "model_type"] == sweep.model_types(), "regenerate: python -m llmc.sweep --write docs/architectures.md"


@pytest.mark.parametrize("model_type, message", [
    ("mpt", r"^MptForCausalLM: none of its 2 layers computes attention through transformers' attention interface "),
    ("diffllama", r"^DiffLlamaForCausalLM: its 2 layers call transformers' attention interface 4 times \(a layer "
                  r"attends more than once"),
])
def test_attention_outside_the_interface_is_counted_per_layer(model_type, message, tmp_path):
    sweep.make_checkpoint(model_type, tmp_path / "ckpt")
    with pytest.raises(BUILD_ERRORS, match=message) as e:
        llmc.build(tmp_path / "ckpt", tmp_path / "engine", max_seq_len=64, max_batch_tokens=32, log=lambda _: None)
    assert "\n" not in str(e.value)


def test_a_model_without_a_position_limit_takes_the_engines():
    from transformers import XLNetConfig

    from llmc.engine import MAX_SEQ_LEN
    from llmc.frontend.rope import max_context

    assert XLNetConfig().max_position_embeddings == -1  # transformers' "no sequence length limit"
    assert max_context(XLNetConfig()) == MAX_SEQ_LEN


def test_a_conversion_target_asked_for_before_the_first_is_read(tmp_path):
    # HRM's checkpoint fuses gate, q, k and v into one gqkv_proj; its graph asks for q first, and the conversion
    # that makes q made gate too, which must wait for its turn instead of being dropped.
    from llmc.frontend.checkpoint import Checkpoint
    from llmc.frontend.export import CheckpointWeights, build_meta_model

    model = sweep.make_checkpoint("hrm_text", tmp_path / "ckpt")
    ckpt = Checkpoint(tmp_path / "ckpt")
    weights = CheckpointWeights(ckpt, build_meta_model(ckpt, torch.float32))
    assert not any("self_attn.q_proj" in key for key in ckpt.keys())
    params = dict(model.named_parameters())
    for proj in ("q", "gate", "v", "k"):
        name = f"model.L_module.layers.0.self_attn.{proj}_proj.weight"
        assert torch.equal(weights.get(name), params[name])


def test_parameters_made_off_the_default_device_are_traced_on_meta(tmp_path):
    # XLNet makes its parameters with torch.FloatTensor(...), on the CPU whatever the default device; moved to meta,
    # its trace gets to the model's real limit: a relative shift that holds for every token count but one.
    sweep.make_checkpoint("xlnet", tmp_path / "ckpt")
    with pytest.raises(BUILD_ERRORS, match=r"could not trace XLNetLMHeadModel: the model's code holds only where "
                                           r"\(\(\(-1\) \+ 2\*num_tokens\) % num_tokens\) != 0, and one program") as e:
        llmc.build(tmp_path / "ckpt", tmp_path / "engine", max_seq_len=32, log=lambda _: None)
    assert "\n" not in str(e.value)
