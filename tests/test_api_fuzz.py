"""Property-based tests of the HTTP API: whatever the body, a request gets an answer (never a 5xx, never a
hang), and the server goes on serving correctly (a greedy control request keeps its reference answer).

Bodies come from hypothesis strategies over the request models' fields: mostly values of the right type,
in and out of range, mixed with values of any JSON type, NaN and Infinity literals, huge integers and
lone surrogates.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from llmc.runtime.api_server import build_app
from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.llm_engine import LLMEngine

from test_server import Server, chat_engine

CONTROL = {"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}
CASES = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

surrogates = st.characters(categories=["Cs"])
text = st.text(max_size=12) | st.builds("".join, st.lists(st.characters() | surrogates, max_size=6))
any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


token = st.integers(0, 319)
valid_text = st.text(max_size=12)
# In range, extremes included: each of these must be served (200).
VALID = {
    "model": st.just("tiny-llama"),
    "max_tokens": st.integers(1, 6) | st.just(10**30),
    "temperature": st.floats(0, 2) | st.sampled_from([1e-40, 1e-5, 1e5, 1e300]),
    "top_p": st.floats(1e-12, 1) | st.just(1e-300),
    "top_k": st.integers(-1, 400) | st.just(10**30),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 10) | st.sampled_from([1e-38, 1e-5, 1e38]),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=16),
    "stop_token_ids": st.lists(token, max_size=5),
    "logit_bias": st.dictionaries(token.map(str), st.floats(-100, 100), max_size=6),
    "ignore_eos": st.booleans(),
    "n": st.integers(1, 3),
    "best_of": st.integers(1, 4),
    "min_tokens": st.integers(0, 1),
    "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    # Structured output: each alone is valid; two in one body are a 400.
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                        {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}]),
    "guided_json": st.sampled_from([{"type": "integer"}, {"enum": ["a", "b"]}, '{"type": "array", "maxItems": 2}']),
    "guided_regex": st.sampled_from(["[a-z]+", "(yes|no)", r"\d{1,3}", "a{99999999}"]),
    "guided_choice": st.lists(valid_text.filter(bool), min_size=1, max_size=3),
    "guided_grammar": st.just('root ::= "a" root | "b"'),
    "guided_decoding_backend": st.sampled_from(["xgrammar", "xgrammar:disable-any-whitespace"]),
}
# Out of range or of another type.
number = st.floats(-1e3, 1e3) | st.sampled_from([-1e-40, 1e400, float("nan"), float("inf"), -float("inf")])
HOSTILE = {
    "model": text,
    "max_tokens": st.integers(-(2**70), 0) | st.floats(),
    "temperature": number,
    "top_p": number,
    "top_k": st.integers(-(2**70), -2),
    "min_p": number,
    "presence_penalty": number,
    "frequency_penalty": number,
    "repetition_penalty": number | st.just(0),
    "seed": st.integers(2**64, 2**70) | st.integers(-(2**70), -(2**63) - 1),
    "stop": st.lists(text, max_size=20) | st.text(min_size=257, max_size=300),
    "stop_token_ids": st.lists(st.integers(-(2**70), 2**70), max_size=3),
    "logit_bias": st.dictionaries(text | st.integers(-5, 400).map(str), number, max_size=4),
    "n": st.integers(-3, 0) | st.integers(129, 2**70),
    "best_of": st.integers(-3, 0) | st.integers(129, 2**70),
    "min_tokens": st.integers(-(2**70), -1) | st.integers(10**6, 2**70),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_schema", "json_object", "yaml"]) | text},
                                             optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": any_json}) | any_json}),
    "guided_json": text | any_json,
    "guided_regex": text,
    "guided_choice": st.lists(text, max_size=3),
    "guided_grammar": text,
    "guided_decoding_backend": text,
}


def bodies(required_valid: dict, required_hostile: dict, valid: dict, hostile: dict):
    """Half all-valid bodies, half with each field valid, hostile, or anything JSON holds."""
    def mixed(name, strategy):
        return strategy | hostile.get(name, any_json) | any_json

    return st.fixed_dictionaries(required_valid, optional=valid) | st.fixed_dictionaries(
        {k: mixed(k, v) for k, v in required_hostile.items()}, optional={k: mixed(k, v) for k, v in valid.items()}
    )


prompt = valid_text | st.lists(token, min_size=1, max_size=12) | st.lists(valid_text, min_size=1, max_size=3) | st.lists(st.lists(token, min_size=1, max_size=4), min_size=1, max_size=3)
completion_bodies = bodies(
    {"prompt": prompt},
    {"prompt": prompt | text | st.lists(st.integers(-(2**70), 2**70), max_size=4) | st.lists(text, max_size=3)},
    {**VALID, "logprobs": st.integers(0, 20), "echo": st.booleans()},
    {**HOSTILE, "logprobs": st.integers(-3, -1) | st.integers(21, 2**70)},
)
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]),
    "content": valid_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": valid_text}), max_size=3),
})
hostile_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant"]) | text,
    "content": text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | text, "text": text | any_json}), max_size=3) | any_json,
})
chat_bodies = bodies(
    {"messages": st.lists(message, min_size=1, max_size=3)},
    {"messages": st.lists(message | hostile_message, max_size=3)},
    {**VALID, "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20)},
    {**HOSTILE, "max_completion_tokens": st.integers(-3, 0), "top_logprobs": st.integers(21, 99)},
)


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """A server on a tiny engine (32 tokens per request, so that any max_tokens ends soon), its control answer."""
    llm = AsyncLLM(LLMEngine(chat_engine(checkpoints, tmp_path_factory, max_seq_len=32)))
    server = Server(build_app(llm, "tiny-llama"))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reference = client.post("/v1/completions", json=CONTROL).json()["choices"][0]["text"]
        yield client, reference, llm
    server.stop()
    llm.shutdown()


GUIDED_FIELDS = ["response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar"]


def with_one_guided_field(values: dict):
    """Completion bodies of valid fields and exactly one structured-output field, of `values`' strategies."""
    # Prompt and max_tokens within the engine's 32 tokens (5 characters: at most 4 byte tokens each, and BOS and a space).
    prompts = st.text(min_size=1, max_size=5) | st.lists(token, min_size=1, max_size=12)
    fields = {**{k: v for k, v in VALID.items() if k not in GUIDED_FIELDS}, "max_tokens": st.integers(1, 6)}
    base = st.fixed_dictionaries({"prompt": prompts, "max_tokens": fields.pop("max_tokens")}, optional=fields).map(valid_best_of)
    return st.builds(lambda body, guided: {**body, **guided}, base, st.one_of(*(st.fixed_dictionaries({k: values[k]}) for k in GUIDED_FIELDS)))


def valid_best_of(body: dict) -> dict:
    """best_of made valid beside the body's n: at least n, and n itself when streaming."""
    if "best_of" in body:
        n = body.get("n", 1)
        body["best_of"] = n if body.get("stream") else max(n, body["best_of"])
    return body


def check(served, counter, path: str, body: dict, must_serve: bool = False) -> None:
    client, reference, llm = served
    content = json.dumps(body)  # NaN and Infinity as Python writes them; lone surrogates as \ud800 escapes
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (content, r.text)
    assert r.status_code == 200 or not must_serve, (content, r.text)
    if r.status_code == 200 and body.get("stream") is True:
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e[:12] for e in events), (content, r.text)
    elif r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and error["type"]
    if next(counter) % 10 == 0:
        assert client.get("/health").status_code == 200
        assert client.post("/v1/completions", json=CONTROL).json()["choices"][0]["text"] == reference
        assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def counter():
    return itertools.count(1)


@CASES
@given(body=completion_bodies)
def test_any_completion_request_gets_an_answer(served, counter, body):
    check(served, counter, "/v1/completions", body)


@CASES
@given(body=chat_bodies)
def test_any_chat_request_gets_an_answer(served, counter, body):
    check(served, counter, "/v1/chat/completions", body)


@settings(CASES, max_examples=60)
@given(body=with_one_guided_field(VALID))
def test_any_valid_structured_output_request_is_served(served, counter, body):
    check(served, counter, "/v1/completions", body, must_serve=True)


@settings(CASES, max_examples=60)
@given(body=with_one_guided_field(HOSTILE))
def test_any_structured_output_request_gets_an_answer(served, counter, body):
    check(served, counter, "/v1/completions", body)
