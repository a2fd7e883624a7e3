"""Property-based tests of the HTTP API: whatever the body, a request gets an answer (never a 5xx, never a
hang), and the server goes on serving correctly (a greedy control request keeps its reference answer).

Bodies come from hypothesis strategies over the request models' fields: mostly values of the right type,
in and out of range, mixed with values of any JSON type, NaN and Infinity literals, huge integers and
lone surrogates.
"""

from __future__ import annotations

import itertools
import json
import shutil

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import llmc
from llmc.runtime.api_server import build_app
from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.llm_engine import LLMEngine

from conftest import tokenizer
from test_server import CHAT_TEMPLATE, Server

CONTROL = {"prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}
CASES = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

surrogates = st.characters(categories=["Cs"])
text = st.text(max_size=12) | st.builds("".join, st.lists(st.characters() | surrogates, max_size=6))
any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


def field(typed):
    """A field's value: mostly of its type (in range or not), sometimes anything JSON holds."""
    return typed | typed | any_json


token = st.integers(-3, 330)
number = st.floats(-3, 3) | st.sampled_from([0.0, 1e-40, 1e-5, 1e38, -1e38, 1e300, float("nan"), float("inf")])
SAMPLING = {
    "model": st.sampled_from(["tiny-llama", "gpt-4"]),
    "max_tokens": st.integers(-2, 6) | st.sampled_from([10**30, 2**63]),
    "temperature": number,
    "top_p": number,
    "top_k": st.integers(-3, 400) | st.just(10**30),
    "min_p": number,
    "presence_penalty": number,
    "frequency_penalty": number,
    "repetition_penalty": number | st.sampled_from([1e-38, 1e-30]),
    "seed": st.integers(-(2**64), 2**65),
    "stop": text | st.lists(text, max_size=20),
    "stop_token_ids": st.lists(token, max_size=5),
    "logit_bias": st.dictionaries(token.map(str) | text, st.floats(-150, 150) | number, max_size=4),
    "ignore_eos": st.booleans(),
    "n": st.integers(0, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
prompt = text | st.lists(token, max_size=12) | st.lists(text, max_size=3) | st.lists(st.lists(token, max_size=4), max_size=3)
completion_bodies = st.fixed_dictionaries(
    {"prompt": field(prompt)},
    optional={**{k: field(v) for k, v in SAMPLING.items()}, "logprobs": field(st.integers(-1, 25)), "echo": field(st.booleans())},
)
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | text, "text": field(text)})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]) | text, "content": field(text | st.lists(part, max_size=3))}
)
chat_bodies = st.fixed_dictionaries(
    {"messages": field(st.lists(message, max_size=3))},
    optional={
        **{k: field(v) for k, v in SAMPLING.items()},
        "max_completion_tokens": field(st.integers(-2, 6)),
        "logprobs": field(st.booleans()),
        "top_logprobs": field(st.integers(-1, 25)),
    },
)


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    """A server on a tiny engine (32 tokens per request, so that any max_tokens ends soon), its control answer."""
    ckpt = shutil.copytree(checkpoints["llama"], tmp_path_factory.mktemp("c") / "llama")
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(ckpt)
    engine = llmc.build(ckpt, tmp_path_factory.mktemp("e") / "tiny-llama", max_seq_len=32, max_batch_tokens=64, log=lambda _: None)
    llm = AsyncLLM(LLMEngine(engine))
    server = Server(build_app(llm, "tiny-llama"))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        reference = client.post("/v1/completions", json=CONTROL).json()["choices"][0]["text"]
        yield client, reference, llm
    server.stop()
    llm.shutdown()


def check(served, counter, path: str, body: dict) -> None:
    client, reference, llm = served
    content = json.dumps(body)  # NaN and Infinity as Python writes them; lone surrogates as \ud800 escapes
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (content, r.text)
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
