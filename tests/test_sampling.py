"""Sampling features against Hugging Face's logits processors, and stop conditions end to end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmc import LLM, SamplingParams
from llmc.runtime.sampler import apply_penalties, filter_logits, sample
from llmc.runtime.sampling_params import InvalidParam
from llmc.runtime.sequence import Sequence

from conftest import VOCAB


@pytest.fixture(scope="module")
def llm(llama_engine):
    return LLM(llama_engine)


def test_filters_match_transformers_warpers():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.8, min_p=0.05)
    ours = filter_logits(logits, [params])[0]
    ids = torch.zeros(1, 1, dtype=torch.long)
    theirs = logits
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)):
        theirs = warper(ids, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs[0]))
    torch.testing.assert_close(ours.softmax(-1), theirs[0].softmax(-1))


def test_batched_filters_and_draws_match_each_row_alone():
    """One call over rows with different params gives each row what it gets alone; seeded draws ignore the batch."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=0.7, top_k=40, top_p=0.8, seed=1), SamplingParams(temperature=1.3, seed=2),
              SamplingParams(temperature=0.5, min_p=0.1, seed=3), SamplingParams(temperature=1.0, top_p=0.3, seed=4)]
    together = filter_logits(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(together[i], filter_logits(logits[i : i + 1], [p])[0])
    for _ in range(3):
        batch, alone = [Sequence([1], p) for p in params], [Sequence([1], p) for p in params]
        tokens = [sample(logits, batch)[0] for _ in range(5)]
        assert tokens == [[sample(logits[i : i + 1], [alone[i]])[0][0] for i in range(4)] for _ in range(5)]
    assert len({tuple(t) for t in tokens}) > 1  # the generators move on: not the same tokens every step


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
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, repetition_penalty=8.0))[0].outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=8.0)
    assert ours == theirs[0, 12:].tolist()
    assert ours != llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].token_ids


def test_bad_words_match_transformers_generate(llm, checkpoints):
    """Banned token sequences (one token, and two tokens whose first is allowed) as HF's bad_words_ids."""
    prompt = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    base = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].token_ids
    bad = [[base[2]], [base[5], base[6]]]
    ours = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, bad_words_ids=bad))[0].outputs[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, bad_words_ids=bad)
    assert ours == theirs[0, 10:].tolist() and ours != base
    assert base[2] not in ours


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0))[0]
    stop = base.outputs[0].text[5:8]
    out = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == base.outputs[0].text[: base.outputs[0].text.index(stop)]
    kept = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop=stop, include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == base.outputs[0].text[: base.outputs[0].text.index(stop) + len(stop)]
    by_id = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[base.outputs[0].token_ids[6]]))[0]
    assert by_id.outputs[0].finish_reason == "stop" and by_id.outputs[0].token_ids == base.outputs[0].token_ids[: base.outputs[0].token_ids.index(base.outputs[0].token_ids[6]) + 1]


def test_min_tokens_holds_off_stop_tokens_and_strings(llm):
    base = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    stop_id = base.token_ids[1]
    held = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_id], min_tokens=6))[0].outputs[0]
    assert stop_id not in held.token_ids[:6] and len(held.token_ids) > 6
    assert held.finish_reason == "length" or (held.token_ids[-1] == stop_id and held.stop_reason == stop_id)
    stop = base.text[:3]  # would stop at once
    late = llm.generate("def fib(n):", SamplingParams(max_tokens=24, temperature=0, stop=[stop], min_tokens=6))[0].outputs[0]
    assert late.text.startswith(stop) and len(late.token_ids) >= 6 and (late.finish_reason == "length" or late.stop_reason == stop)


def test_n_and_best_of(llm):
    prompt = list(range(5, 45))
    every = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=5))[0]
    assert [c.index for c in every.outputs] == list(range(5)) and all(c.cumulative_logprob is None for c in every.outputs)
    scored = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=5, logprobs=0))[0]
    assert [c.token_ids for c in scored.outputs] == [c.token_ids for c in every.outputs]  # seed + index per sample
    for c in scored.outputs:
        assert c.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs)))
    best = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=2, best_of=5))[0]
    ranked = sorted(scored.outputs, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked] and [c.index for c in best.outputs] == [c.index for c in ranked]
    scoring_only = llm.generate(prompt, SamplingParams(max_tokens=0, n=3, prompt_logprobs=1))[0]
    assert [(c.token_ids, c.finish_reason) for c in scoring_only.outputs] == [([], "length")] * 3
    assert len(scoring_only.prompt_logprobs) == len(prompt) and scoring_only.prompt_logprobs[0] is None
    assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.usage == 0


def test_logprobs_of_chosen_tokens(llm):
    out = llm.generate("import os", SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    assert len(out.outputs[0].logprobs) == 6
    for token, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert lp[token] == max(lp.values()) and len(lp) == 3  # greedy: the chosen token is the top one
        assert all(v <= 0 for v in lp.values())


def test_stream_yields_each_token_and_the_same_text(llm):
    params = SamplingParams(max_tokens=20, temperature=0)
    full = llm.generate("class A:", params)[0]
    outs = list(llm.stream("class A:", params))
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 21))
    assert "".join(o.outputs[0].delta_text for o in outs) == full.outputs[0].text and outs[-1].finished


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


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(seed=2**64), "seed"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(stop=["x"] * 17), "stop"),
        (dict(stop="x" * 257), "stop"),
        (dict(logit_bias={5: 100.5}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
    ],
)
def test_non_finite_and_out_of_range_params_are_refused(kwargs, param):
    with pytest.raises(InvalidParam) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 320\)"):
        llm.generate("def", SamplingParams(logit_bias={VOCAB: 1.0}))
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_is_added_to_the_logits(llm):
    forced = llm.generate("def", SamplingParams(max_tokens=5, temperature=0, logit_bias={17: 100}))[0].outputs[0].token_ids
    assert forced == [17] * 5
    sampled = llm.generate("def", SamplingParams(max_tokens=5, temperature=1.0, seed=3, logit_bias={t: -100 for t in range(VOCAB) if t != 9}))[0]
    assert sampled.outputs[0].token_ids == [9] * 5


extreme = st.sampled_from([0.0, 1e-40, 1e-5, 1.0, 1e5, 1e38, 1e300])
admitted = st.builds(
    SamplingParams,
    temperature=extreme,
    top_k=st.integers(-1, 2 * VOCAB),
    top_p=st.sampled_from([1e-12, 0.5, 1.0]),
    min_p=st.sampled_from([0.0, 1e-12, 0.5, 1.0]),
    repetition_penalty=st.sampled_from([1e-38, 1e-5, 1.0, 2.0, 1e38]),
    presence_penalty=st.sampled_from([-2.0, 0.0, 2.0]),
    frequency_penalty=st.sampled_from([-2.0, 0.0, 2.0]),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.sampled_from([-100.0, -1e-30, 100.0]), max_size=8),
    bad_words_ids=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=2), max_size=3),
    seed=st.integers(-(2**63), 2**64 - 1),
    logprobs=st.sampled_from([None, 0, 20]),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(params=admitted, scale=st.sampled_from([1.0, 1e30, 3e38]), history=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6))
def test_every_admitted_value_samples_a_token(params, scale, history):
    """Whatever validation admits, even with logits near float32's limits, sampling gives a token in the vocabulary."""
    logits = (torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(len(history))) * scale).clamp(-3e38, 3e38)
    seqs = [Sequence(history[:1], params), Sequence(history, params)]
    seqs[1].num_prompt_tokens = 1  # the rest is output, so presence and frequency penalties apply
    tokens, logprobs = sample(logits, seqs)
    assert all(0 <= t < VOCAB for t in tokens)
    assert (logprobs == [None, None]) == (params.logprobs is None)
