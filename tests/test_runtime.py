"""Batching, chunked prefill, preemption and sampling: the runtime's answers do not depend on how it batched."""

from __future__ import annotations

import pytest
import torch

import llmc
from llmc import LLM, SamplingParams
from llmc.runtime.sampler import sample
from llmc.runtime.sequence import Sequence

from conftest import VOCAB

GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return llmc.build(checkpoints["qwen2"], tmp_path_factory.mktemp("e") / "engine", max_seq_len=64, max_batch_tokens=32, log=lambda _: None)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 37, 12, 30, 21, 8)]


@pytest.fixture(scope="module")
def alone(engine, prompts):
    llm = LLM(engine)
    return [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


def test_batched_equals_alone(engine, prompts, alone):
    assert [o.outputs[0].token_ids for o in LLM(engine).generate(prompts, GREEDY)] == alone


def test_preemption_recomputes_and_gives_the_same_tokens(engine, prompts, alone):
    llm = LLM(engine, kv_cache_tokens=64)  # one full-length request at a time
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.schedulers[0].num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outputs] == alone
    assert len(llm.engine.block_manager.free_blocks) == llm.engine.block_manager.num_blocks


def test_kv_cache_smaller_than_one_request_is_refused(engine):
    with pytest.raises(ValueError, match="cannot hold one request of max_seq_len=64"):
        LLM(engine, kv_cache_tokens=32)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine, prompts):
    llm = LLM(engine)
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9)
    batched = llm.generate([prompts[1], prompts[0], prompts[2]], [others, seeded, others])[1].outputs[0].token_ids
    assert batched == alone
    assert llm.generate([prompts[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0].outputs[0].token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(engine, prompts, alone):
    llm = LLM(engine)
    for params in (SamplingParams(max_tokens=24, temperature=1.0, top_k=1), SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6)):
        assert llm.generate([prompts[1]], params)[0].outputs[0].token_ids == alone[1]


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {"k": set(), "p": set()}
    for seed in range(200):
        k = Sequence([0], SamplingParams(top_k=2, seed=seed))
        p = Sequence([0], SamplingParams(top_p=0.7, seed=seed))
        draws["k"].add(sample(logits, [k])[0][0])
        draws["p"].add(sample(logits, [p])[0][0])
    assert draws == {"k": {0, 1}, "p": {0, 1}}


def test_text_prompts_and_eos(llama_engine):
    """A text prompt is tokenized with the checkpoint's tokenizer; EOS ends a request unless ignore_eos."""
    llm = LLM(llama_engine)
    out = llm.generate("def fib(n):", GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer("def fib(n):")["input_ids"]
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    llm.engine.eos_token_ids = {out.outputs[0].token_ids[3]}
    stopped = llm.generate("def fib(n):", GREEDY)[0]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].token_ids == out.outputs[0].token_ids[: out.outputs[0].token_ids.index(out.outputs[0].token_ids[3]) + 1]
    ignored = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert ignored.outputs[0].token_ids == out.outputs[0].token_ids


def test_staggered_arrivals_equal_alone(engine, prompts, alone):
    """Requests joining a running batch at different steps get the same tokens as alone."""
    from llmc.runtime.llm_engine import LLMEngine

    core = LLMEngine(engine)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]}  # step -> prompts that arrive then
    finished, step = {}, 0
    while len(finished) < len(prompts):
        for i in arrivals.get(step, []):
            core.add_request(prompts[i], GREEDY, request_id=str(i))
        finished.update((int(o.request_id), o.outputs[0].token_ids) for o in core.step() if o.finished)
        step += 1
    assert [finished[i] for i in range(len(prompts))] == alone


def test_chunked_prefill_equals_unchunked(engine, prompts, alone):
    llm = LLM(engine)
    llm.engine.schedulers[0].max_batch_tokens = 4096  # every prompt in one piece
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == alone
    llm.engine.schedulers[0].max_batch_tokens = 3  # a few tokens a step
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == alone


def test_kv_cache_memory_in_gib(engine):
    llm = LLM(engine, kv_cache_memory=0.001)
    kv = llm.engine.config.kv_cache
    bytes_per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * 4
    assert llm.engine.block_manager.num_blocks == -(-(int(0.001 * 2**30) // bytes_per_token) // 16)
    with pytest.raises(ValueError, match=r"cannot hold one request of max_seq_len=64 \(.* GiB\)"):
        LLM(engine, kv_cache_memory=1e-6)
