"""Sampling features against Hugging Face's logits processors, and stop conditions end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import llmc
from llmc import LLM, SamplingParams
from llmc.runtime.sampler import apply_penalties, filter_logits
from llmc.runtime.sequence import Sequence

from conftest import VOCAB


@pytest.fixture(scope="module")
def llm(checkpoints, tmp_path_factory):
    return LLM(llmc.build(checkpoints["llama"], tmp_path_factory.mktemp("e") / "engine", max_seq_len=96, log=lambda _: None))


def test_filters_match_transformers_warpers():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, min_p=0.05)
    ours = filter_logits(logits[0], params)
    ids = torch.zeros(1, 1, dtype=torch.long)
    theirs = logits
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        theirs = warper(ids, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0]))
    torch.testing.assert_close(ours.softmax(-1), theirs[0].softmax(-1))


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    seq = Sequence([5, 9, 9, 200], SamplingParams(repetition_penalty=1.3))
    seq.token_ids += [7, 5]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits[None].clone())[0]
    torch.testing.assert_close(apply_penalties(logits, seq), expected)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    seq = Sequence([3, 3], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    seq.token_ids += [4, 4, 4, 6]
    out = apply_penalties(torch.zeros(8), seq)
    assert out.tolist() == [0, 0, 0, 0, -1.25, 0, -0.75, 0]


def test_greedy_with_repetition_penalty_matches_transformers_generate(llm, checkpoints):
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, repetition_penalty=8.0))[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=8.0)
    assert ours == theirs[0, 12:].tolist()
    assert ours != llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].token_ids


def test_bad_words_match_transformers_generate(llm, checkpoints):
    """Banned token sequences (one token, and two tokens whose first is allowed) as HF's bad_words_ids."""
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    base = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].token_ids
    bad = [[base[2]], [base[5], base[6]]]
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, bad_words_ids=bad))[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, bad_words_ids=bad)
    assert ours == theirs[0, 10:].tolist() and ours != base
    assert base[2] not in ours


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0))[0]
    stop = base.text[5:8]
    out = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == base.text[: base.text.index(stop)]
    kept = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop=stop, include_stop_str_in_output=True))[0]
    assert kept.text == base.text[: base.text.index(stop) + len(stop)]
    by_id = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[base.token_ids[6]]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[6]) + 1]


def test_logprobs_of_chosen_tokens(llm):
    out = llm.generate("import os", SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 6
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp[token] == max(lp.values()) and len(lp) == 3  # greedy: the chosen token is the top one
        assert all(v <= 0 for v in lp.values())


def test_stream_yields_each_token_and_the_same_text(llm):
    params = SamplingParams(max_tokens=20, temperature=0)
    full = llm.generate("class A:", params)[0]
    outs = list(llm.stream("class A:", params))
    assert [len(o.token_ids) for o in outs] == list(range(1, 21))
    assert "".join(o.delta_text for o in outs) == full.text and outs[-1].finished


def test_stream_closed_early_frees_the_request(llm):
    blocks = llm.engine.block_manager
    for i, out in enumerate(llm.stream("def fib(n):", SamplingParams(max_tokens=50, temperature=0))):
        if i == 2:
            break
    assert not llm.engine.has_unfinished_requests() and blocks.usage == 0


@pytest.mark.parametrize("kwargs", [dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=3), dict(logprobs=50), dict(stop=[""]), dict(bad_words_ids=[[]])])
def test_more_invalid_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
