"""Every supported architecture against Hugging Face transformers, the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmc
from llmc import LLM, SamplingParams
from llmc.runtime.sequence import Sequence
from llmc.runtime.step_inputs import prepare_inputs

from conftest import ARCHITECTURES, VOCAB

PROMPT_LENGTHS = (3, 11, 19, 40)  # longer than the step budget below, so prefill is chunked
NEW_TOKENS = 16


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_match_transformers_fp32(arch, checkpoints, tmp_path):
    engine = llmc.build(checkpoints[arch], tmp_path / "engine", max_seq_len=96, max_batch_tokens=16, log=lambda _: None)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]

    outputs = LLM(engine).generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))

    for prompt, out in zip(prompts, outputs):
        # A fresh model per prompt: transformers' dynamic RoPE keeps the frequencies of the longest sequence it has
        # seen for shorter ones that follow (down to max_position_embeddings), so one model's answer depends on order.
        reference = AutoModelForCausalLM.from_pretrained(checkpoints[arch]).eval()
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt, NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"


# bf16 rounds differently in every kernel. The logits of these tiny models are O(1), where one bf16
# ulp is 7.8e-3; llmc's bf16 logits stay within 2e-2 of HF's (measured: 2e-3 to 4e-3).
BF16_ATOL = 2e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "gptj", "deepseek_v2", "llama4_text"])
def test_bf16_logits_close_to_transformers(arch, checkpoints, tmp_path):
    engine = llmc.build(checkpoints[arch], tmp_path / "engine", dtype="bfloat16", max_seq_len=64, log=lambda _: None)
    llm = LLM(engine)
    prompt = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    seq = Sequence(prompt, SamplingParams(max_tokens=1))
    llm.engine.block_manager.allocate(seq, len(prompt))
    logits = llm.engine.executor.execute(prepare_inputs([(seq, len(prompt))], llm.engine.block_size)[0])

    reference = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0, -1].float()
    assert (logits[0] - expected).abs().max().item() <= BF16_ATOL
