"""Structured output (guided decoding through xgrammar) on the example model: from Python and over HTTP.

Every generated text must follow its grammar whole: parse as JSON valid against the schema, match the
regex fully, be one of the choices; and end because the grammar was complete (finish_reason "stop").
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

import llmc
from llmc import LLM, GuidedDecodingParams, SamplingParams
from llmc.runtime.api_server import build_app
from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.sampling_params import InvalidParam

from test_server import CHAT_TEMPLATE, Server

PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "size": {"type": "integer", "minimum": 0, "maximum": 999},
        "mode": {"enum": ["r", "w", "a"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "size", "mode"],
    "additionalProperties": False,
}
REGEX = r"[a-z_]{2,10}\.(py|txt|cfg)"
CHOICES = ["os.path", "sys.argv", "re.compile"]
GREEDY, SAMPLED = dict(temperature=0), dict(temperature=1.0, top_p=0.95)


@pytest.fixture(scope="module")
def engine(example_engine):
    return example_engine


@pytest.fixture(scope="module")
def llm(engine):
    return LLM(engine)


def samples(outputs: list) -> list:
    """Every request's samples (CompletionOutput), in order."""
    return [sample for out in outputs for sample in out.outputs]


def follows(kind: str, text: str) -> bool:
    """Whether `text` is, whole, what the grammar of `kind` (the constants above) describes."""
    if kind == "json":
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "json_object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    return text in CHOICES


GUIDED = {  # grammars of bounded length: every request ends with its grammar complete
    "json": GuidedDecodingParams(json=SCHEMA, disable_any_whitespace=True),
    "regex": GuidedDecodingParams(regex=REGEX),
    "choice": GuidedDecodingParams(choice=CHOICES),
}


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", list(GUIDED))
def test_generated_text_follows_the_grammar(llm, kind, sampling):
    params = SamplingParams(max_tokens=120, seed=7, guided_decoding=GUIDED[kind], **sampling)
    for out in samples(llm.generate(PROMPTS, params)):
        assert follows(kind, out.text), out.text
        assert out.finish_reason == "stop"


@pytest.mark.parametrize("kind", ["regex", "choice"])
def test_each_sample_of_a_request_follows_the_grammar(llm, kind):
    """n=2 and best_of: each sample has its own grammar state (one shared would be advanced by both samples' tokens)."""
    for extra in (dict(n=2), dict(n=2, best_of=3)):
        params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, guided_decoding=GUIDED[kind], **extra)
        outputs = llm.generate(PROMPTS, params)
        assert all(len(out.outputs) == 2 for out in outputs)
        for sample in samples(outputs):
            assert follows(kind, sample.text) and sample.finish_reason == "stop", sample.text
        assert any(out.outputs[0].text != out.outputs[1].text for out in outputs)  # the samples are drawn apart


def test_json_object(llm):
    """Any JSON object: unbounded, so this model (which writes Python) may fill a string until max_tokens;
    whatever ends with the grammar complete is an object."""
    guided = GuidedDecodingParams(json_object=True, disable_any_whitespace=True)
    outputs = samples(llm.generate(PROMPTS * 2, [SamplingParams(max_tokens=120, temperature=1.0, seed=s, guided_decoding=guided) for s in range(6)]))
    assert all(follows("json_object", o.text) for o in outputs if o.finish_reason == "stop")
    assert sum(o.finish_reason == "stop" for o in outputs) >= 3
    assert all(o.text.startswith("{") and o.finish_reason == "length" for o in outputs if o.finish_reason != "stop")


def test_unguided_output_would_not_follow_the_grammar(llm):
    """The tests above prove something: the model left alone writes Python, not these grammars."""
    for out in samples(llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0))):
        assert not any(follows(kind, out.text) for kind in ["json_object", *GUIDED]), out.text


def test_grammar_does_not_disturb_other_requests_in_the_batch(llm):
    """In-flight batching: unguided requests beside guided ones get exactly what they get alone."""
    free = SamplingParams(max_tokens=30, temperature=0)
    alone = [o.token_ids for o in samples(llm.generate(PROMPTS, free))]
    params = [free, SamplingParams(max_tokens=60, temperature=0, guided_decoding=GUIDED["json"])] * len(PROMPTS)
    mixed = samples(llm.generate([p for p in PROMPTS for _ in range(2)], params))
    assert [o.token_ids for o in mixed[::2]] == alone
    assert all(follows("json", o.text) for o in mixed[1::2])


def test_eos_only_once_the_grammar_is_complete_and_grammar_ends_with_ignore_eos(llm):
    """A regex that takes at least 40 characters is never cut short by EOS; with ignore_eos the request still
    ends when the grammar is complete (the grammar then allows nothing but EOS)."""
    long = GuidedDecodingParams(regex=r"[a-z]{40,45}")
    for ignore_eos in (False, True):
        for out in samples(llm.generate(PROMPTS, SamplingParams(max_tokens=80, temperature=0, ignore_eos=ignore_eos, guided_decoding=long))):
            assert re.fullmatch(r"[a-z]{40,45}", out.text) and out.finish_reason == "stop"


def test_min_tokens_the_grammar_cannot_meet_ends_the_request_with_an_error(llm):
    """min_tokens bans EOS; once the grammar is complete it allows only EOS: nothing is left, which is an error, never a
    silent stop short of min_tokens. A min_tokens the grammar can meet is met."""
    params = dict(max_tokens=30, temperature=0, guided_decoding=GUIDED["choice"])
    out = llm.generate(PROMPTS[1], SamplingParams(min_tokens=20, **params))[0]
    assert out.outputs[0].finish_reason == "error" and "min_tokens=20 cannot be met" in out.error, out
    out = llm.generate(PROMPTS[1], SamplingParams(min_tokens=2, **params))[0].outputs[0]
    assert follows("choice", out.text) and out.finish_reason == "stop" and len(out.token_ids) >= 2


def test_json_allows_any_whitespace_unless_disabled(llm):
    """By default (vLLM's) JSON may hold whitespace between tokens; this model, which writes Python, fills it with newlines."""
    spaced = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0, guided_decoding=GuidedDecodingParams(json=SCHEMA)))[0].outputs[0]
    compact = llm.generate(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0, guided_decoding=GUIDED["json"]))[0].outputs[0]
    assert "\n" in spaced.text and "\n" not in compact.text and follows("json", compact.text)


def test_preempted_requests_keep_their_grammar_state(engine):
    """Preemption recomputes a request's tokens: its grammar state must carry on from where it was."""
    small = LLM(engine, kv_cache_tokens=256)  # room for one full-length request
    params = SamplingParams(max_tokens=90, temperature=0, guided_decoding=GuidedDecodingParams(regex=r"([a-z]+_){10,14}[a-z]+"))
    outputs = samples(small.generate(PROMPTS * 2, params))
    assert small.engine.schedulers[0].num_preemptions > 0
    assert all(re.fullmatch(r"([a-z]+_){10,14}[a-z]+", o.text) for o in outputs)


@pytest.mark.slow
def test_multi_rank_engine_masks_the_same(checkpoints, tmp_path):
    """tp 2 (logits from the output rank, over a pipe) and pp 2 (two schedulers, steps in flight) give the single rank's tokens."""
    prompts, regex = ["def fib(n):", "class A:", "import os"], r"[a-z]{3,6}\(\d\)"
    params = SamplingParams(max_tokens=30, temperature=0, guided_decoding=GuidedDecodingParams(regex=regex))
    outputs = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        with LLM(llmc.build(checkpoints["qwen2"], tmp_path / f"tp{tp}pp{pp}", max_seq_len=64, tp=tp, pp=pp, log=lambda _: None)) as llm:
            outputs[tp, pp] = samples(llm.generate(prompts, params))
    assert all(re.fullmatch(regex, o.text) and o.finish_reason == "stop" for o in outputs[1, 1])
    assert [o.token_ids for o in outputs[2, 1]] == [o.token_ids for o in outputs[1, 2]] == [o.token_ids for o in outputs[1, 1]]


def test_finished_and_aborted_requests_drop_their_grammar(llm):
    """Each sample holds its own matcher until it finishes or its request is aborted (samples held back included)."""
    engine = llm.engine
    done = engine.add_request(engine.tokenize(PROMPTS[0]), SamplingParams(max_tokens=50, n=2, guided_decoding=GUIDED["choice"]))
    aborted = engine.add_request(engine.tokenize(PROMPTS[1]), SamplingParams(max_tokens=50, n=2, guided_decoding=GUIDED["json"]))
    seqs = {rid: engine.requests[rid].seqs for rid in (done, aborted)}
    grammars = [seq.grammar for group in seqs.values() for seq in group]
    assert all(g is not None for g in grammars) and len({id(g) for g in grammars}) == 4
    engine.step()
    engine.abort_request(aborted)
    while engine.has_unfinished_requests():
        engine.step()
    assert [seq.finish_reason for seq in seqs[done]] == ["stop", "stop"] and [seq.finish_reason for seq in seqs[aborted]] == ["abort", "abort"]
    assert all(seq.grammar is None for group in seqs.values() for seq in group)


def test_logprobs_are_the_models_not_the_masks(llm):
    """logprobs come from the model's distribution (as vLLM's): the mask changes the token, not its log-probability."""
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0].outputs[0]
    guided = llm.generate(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0, logprobs=5, guided_decoding=GUIDED["choice"]))[0].outputs[0]
    assert guided.token_ids != free.token_ids
    top = lambda lp: sorted(lp.items(), key=lambda kv: -kv[1])[:5]  # noqa: E731
    got, want = top(guided.logprobs[0]), top(free.logprobs[0])
    assert [t for t, _ in got] == [t for t, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])


@pytest.mark.parametrize("kwargs, param, message", [
    ({}, "guided_decoding", "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "guided_decoding", "got regex, choice"),
    ({"json": "{not json"}, "guided_decoding.json", "not valid JSON"),
    ({"choice": []}, "guided_decoding.choice", "non-empty list"),
    ({"choice": ["a", ""]}, "guided_decoding.choice", "non-empty strings"),
    ({"regex": "\ud800"}, "guided_decoding.regex", "not valid Unicode"),
    ({"json": {"type": "object"}, "disable_any_whitespace": 1}, "guided_decoding.disable_any_whitespace", "true or false"),
])
def test_bad_guided_params_are_refused(kwargs, param, message):
    with pytest.raises(InvalidParam, match=message) as e:
        GuidedDecodingParams(**kwargs)
    assert e.value.param == param


@pytest.mark.parametrize("guided, message", [
    (GuidedDecodingParams(json={"type": "strin"}), 'Unsupported type "strin"'),
    (GuidedDecodingParams(regex="(ab"), "parenthesis is not closed"),
    (GuidedDecodingParams(grammar="root ::= "), "EBNF parser error"),
])
def test_grammars_that_do_not_compile_are_refused_before_queueing(llm, guided, message):
    params = SamplingParams(guided_decoding=guided)
    with pytest.raises(InvalidParam, match=message) as e:
        llm.engine.check_params(params)
    assert e.value.param == f"guided_decoding.{guided.kind}"
    with pytest.raises(InvalidParam, match=message):  # the second request's grammar: the first is not left queued
        llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=2), params])
    assert not llm.engine.has_unfinished_requests()


# ---- over HTTP ----


@pytest.fixture(scope="module")
def server(engine):
    async_llm = AsyncLLM(LLMEngine(engine))
    async_llm.tokenizer.chat_template = CHAT_TEMPLATE  # the example model has none
    server = Server(build_app(async_llm, "stdlib-llama"))
    yield server
    server.stop()
    async_llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


COMPACT = {"guided_decoding_backend": "xgrammar:disable-any-whitespace"}
HTTP_CASES = {  # case -> the request fields that ask for it (completions take response_format too, as vLLM's)
    "json": {"response_format": {"type": "json_schema", "json_schema": {"name": "config", "schema": SCHEMA}}, **COMPACT},
    "guided_json": {"guided_json": SCHEMA, **COMPACT},
    "regex": {"guided_regex": REGEX},
    "choice": {"guided_choice": CHOICES},
}


def kind_of(case: str) -> str:
    return "json" if case == "guided_json" else case


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_chat_and_completions_follow_the_grammar(client, case):
    kind, fields = kind_of(case), dict(HTTP_CASES[case])
    out = client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=120, temperature=0, extra_body=fields)
    assert follows(kind, out.choices[0].text) and out.choices[0].finish_reason == "stop", out.choices[0].text
    native = {"response_format": fields.pop("response_format")} if "response_format" in fields else {}  # the client's own argument
    out = client.chat.completions.create(model="stdlib-llama", messages=[{"role": "user", "content": PROMPTS[1]}],
                                         max_tokens=120, temperature=0.8, seed=3, extra_body=fields, **native)
    assert follows(kind, out.choices[0].message.content) and out.choices[0].finish_reason == "stop", out.choices[0].message.content


def test_json_object_over_http(client):
    fields = {**COMPACT, "repetition_penalty": 1.2}
    out = client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=120, temperature=0,
                                    extra_body={**fields, "response_format": {"type": "json_object"}})
    assert follows("json_object", out.choices[0].text) and out.choices[0].finish_reason == "stop", out.choices[0].text
    out = client.chat.completions.create(model="stdlib-llama", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=120,
                                         temperature=0, response_format={"type": "json_object"}, extra_body=fields)
    assert follows("json_object", out.choices[0].message.content) and out.choices[0].finish_reason == "stop", out.choices[0].message.content


@pytest.mark.parametrize("fields", [{"guided_choice": CHOICES}, {"guided_regex": REGEX}], ids=["choice", "regex"])
def test_each_choice_of_n_follows_the_grammar(client, fields):
    kind = "choice" if "guided_choice" in fields else "regex"
    for extra in ({"n": 2}, {"n": 2, "best_of": 3}):
        out = client.completions.create(model="stdlib-llama", prompt=PROMPTS[:2], max_tokens=60, temperature=1.0, seed=5, extra_body={**fields, **extra})
        assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
        assert all(follows(kind, c.text) and c.finish_reason == "stop" for c in out.choices), [c.text for c in out.choices]
    out = client.chat.completions.create(model="stdlib-llama", messages=[{"role": "user", "content": PROMPTS[0]}], n=2, max_tokens=60,
                                         temperature=1.0, seed=5, extra_body=fields)
    assert len(out.choices) == 2 and all(follows(kind, c.message.content) for c in out.choices), [c.message.content for c in out.choices]


def test_streaming_follows_the_grammar(client):
    chunks = client.completions.create(model="stdlib-llama", prompt=PROMPTS[2], max_tokens=120, temperature=0, stream=True, extra_body=HTTP_CASES["json"])
    assert follows("json", "".join(c.choices[0].text for c in chunks if c.choices))


def test_concurrent_requests_each_follow_their_own_grammar(server, client):
    free = client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=30, temperature=0).choices[0].text

    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        cases = [(case, prompt) for case in HTTP_CASES for prompt in PROMPTS[:2]]
        guided = [async_client.completions.create(model="stdlib-llama", prompt=p, max_tokens=120, temperature=0.7, seed=i, extra_body=HTTP_CASES[c])
                  for i, (c, p) in enumerate(cases)]
        unguided = [async_client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=30, temperature=0) for _ in range(3)]
        return cases, await asyncio.gather(*guided, *unguided)

    cases, outs = asyncio.run(run())
    for (case, _), out in zip(cases, outs):
        assert follows(kind_of(case), out.choices[0].text), (case, out.choices[0].text)
    assert [o.choices[0].text for o in outs[len(cases):]] == [free] * 3


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, "response_format", 'Unsupported type \\\\"strin\\\\"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
    ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(ab"}, "guided_regex", "parenthesis is not closed"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "EBNF parser error"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "send one"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", "send one"),
    ({"guided_regex": "a+", "guided_decoding_backend": "outlines"}, "guided_decoding_backend", "xgrammar"),
])
def test_bad_structured_output_fields_are_400_naming_the_field(server, body, param, message):
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(server.url + path, json={**base, "max_tokens": 4, **body}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert re.search(message, r.text), r.text


def test_response_format_text_asks_for_nothing(client):
    out = client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=20, temperature=0, extra_body={"response_format": {"type": "text"}})
    assert out.choices[0].text == client.completions.create(model="stdlib-llama", prompt=PROMPTS[0], max_tokens=20, temperature=0).choices[0].text
