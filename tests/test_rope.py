"""Every RoPE type of transformers (modeling_rope_utils.ROPE_INIT_FUNCTIONS) matches transformers or is a build error.

Length-dependent RoPE (longrope, dynamic NTK) runs in test_parity.py's architecture sweep (phi3_longrope,
llama_dynamic_rope: prompts and generations cross the switch, batched). Here: the static types, what the
runtime does for length-dependent ones, and the form llmc refuses.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llmc
from llmc import LLM, SamplingParams
from llmc.frontend.checkpoint import CheckpointError

from conftest import VOCAB, make_checkpoint
from test_parity import hf_greedy

STATIC = {
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
    "yarn": dict(max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                               "original_max_position_embeddings": 16}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    "proportional": dict(rope_parameters={"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0}),
}
LENGTH_DEPENDENT = {"dynamic", "longrope"}  # tested in test_parity.py


def test_every_rope_type_of_transformers_is_tested():
    assert set(ROPE_INIT_FUNCTIONS) == set(STATIC) | LENGTH_DEPENDENT


@pytest.mark.parametrize("rope_type", STATIC)
def test_static_rope_types_match_transformers(rope_type, tmp_path):
    checkpoint = make_checkpoint("llama", tmp_path / "checkpoint", initializer_range=0.3, **STATIC[rope_type])
    engine = llmc.build(checkpoint, tmp_path / "engine", max_seq_len=48, max_batch_tokens=16, log=lambda _: None)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 20)]
    outputs = LLM(engine).generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    for prompt, out in zip(prompts, outputs):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, 12)


def test_length_dependent_rope_engine_shares_no_prefix_and_phi3_recomputes_at_its_switch(checkpoints, tmp_path):
    engine = llmc.build(checkpoints["phi3_longrope"], tmp_path / "engine", max_seq_len=48, log=lambda _: None)
    llm = LLM(engine)
    assert llm.engine.config.rope == {"type": "longrope", "recompute_above": 16}
    assert not llm.engine.block_manager.enable_prefix_caching  # a key's rotation depends on its sequence's length
    assert all(s.recompute_above == 16 for s in llm.engine.schedulers)


def test_per_layer_length_dependent_rope_is_a_build_error(tmp_path):
    checkpoint = make_checkpoint(
        "llama", tmp_path / "checkpoint", model_type="gemma3_text", head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )
    with pytest.raises(CheckpointError, match="depend on the sequence length"):
        llmc.build(checkpoint, tmp_path / "engine", max_seq_len=16, log=lambda _: None)
