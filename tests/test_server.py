"""`llmc serve` on loopback, driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import llmc
from llmc import LLM, SamplingParams
from llmc.runtime.api_server import build_app
from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.llm_engine import LLMEngine

from conftest import tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
PROMPTS = ["def fib(n):", "import os\nimport sys\n", "class A:", "The quick brown fox", "return fib(n - 1) +"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving an app on a loopback port, in a thread of the test process."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chat_engine(checkpoints, tmp_path_factory, max_seq_len: int):
    """A tiny Llama engine whose tokenizer has CHAT_TEMPLATE."""
    ckpt = shutil.copytree(checkpoints["llama"], tmp_path_factory.mktemp("c") / "llama")
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(ckpt)
    return llmc.build(ckpt, tmp_path_factory.mktemp("e") / "tiny-llama", max_seq_len=max_seq_len, max_batch_tokens=64, log=lambda _: None)


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return chat_engine(checkpoints, tmp_path_factory, max_seq_len=128)


@pytest.fixture(scope="module")
def server(engine):
    llm = AsyncLLM(LLMEngine(engine))
    server = Server(build_app(llm, "tiny-llama"))
    server.llm = llm
    yield server
    server.stop()
    llm.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def expected(engine):
    """What LLM.generate says, greedy, for each prompt: the server must say the same."""
    llm = LLM(engine)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0)))}


def test_completion(client, expected):
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert out.choices[0].text == expected[PROMPTS[0]]
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 16


def test_completion_with_several_prompts(client, expected):
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[:3], max_tokens=16, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [expected[p] for p in PROMPTS[:3]]


def test_streaming_completion(client, expected):
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[PROMPTS[1]]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_streaming_chat(client, engine):
    messages = [{"role": "user", "content": "def fib(n):"}]
    llm = LLM(engine)
    prompt = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_logprobs(client):
    out = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy picks the likeliest
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                 temperature=0, logprobs=True, top_logprobs=3, stream=True))
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [(i.token, i.logprob) for i in streamed] == [(i.token, pytest.approx(i.logprob)) for i in content]


def test_100_concurrent_streams(server, expected):
    async def one(client, prompt):
        text = ""
        stream = await client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        async for chunk in stream:
            text += chunk.choices[0].text if chunk.choices else ""
        return prompt, text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(100)))

    results = asyncio.run(main())
    assert len(results) == 100
    assert all(text == expected[prompt] for prompt, text in results)


@pytest.mark.parametrize(
    "body, status, message",
    [
        ("{not json", 400, "invalid request"),
        (json.dumps({"model": "gpt-4", "prompt": "x"}), 404, "The model `gpt-4` does not exist"),
        (json.dumps({"prompt": "x", "max_tokens": -1}), 400, "max_tokens must be an integer >= 0"),
        (json.dumps({"prompt": "x", "top_p": 2}), 400, "top_p must be in (0, 1]"),
        (json.dumps({"prompt": "x " * 500}), 400, "at most 128 tokens"),
        (json.dumps({"max_tokens": 3}), 400, "prompt"),
        (json.dumps({"prompt": [1, 2, 99999]}), 400, "token ids must be integers"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, message):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and error["type"]


def post(server, body: dict | str, path: str = "/v1/completions", timeout: float = 60) -> httpx.Response:
    """POST a body as given: a str goes as is (NaN and Infinity literals, lone surrogate escapes), a dict as JSON."""
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=timeout)


@pytest.mark.parametrize(
    "body, param, message",
    [
        ('{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
        ('{"prompt": "x", "top_p": Infinity}', "top_p", "finite number"),
        ('{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty", "finite number"),
        ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0 and finite"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0 and finite"),
        ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty", "in [-2, 2]"),
        ({"prompt": "x", "seed": 2**64}, "seed", "seed must be an integer in [-2**63, 2**64)"),
        ({"prompt": "x", "seed": -(2**63) - 1}, "seed", "seed must be an integer"),
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens", "valid integer"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
        ({"prompt": "x", "top_k": -2}, "top_k", "top_k must be an integer >= 1"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be an integer in [0, 20]"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16 strings"),
        ({"prompt": "x", "stop": "a" * 257}, "stop", "at most 256 characters"),
        ({"prompt": "x", "stop_token_ids": [1] * 1025}, "stop_token_ids", "at most 1024 items"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "keys must be token ids"),
        ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "outside the vocabulary [0, 320)"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "numbers in [-100, 100]"),
        ({"prompt": "x", "n": 0}, "n", "n must be an integer in [1, 128]"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "best_of must be an integer in [n, 128]"),
        ({"prompt": "x", "n": 1, "best_of": 2, "stream": True}, "best_of", "best_of must equal n when streaming"),
        ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", "min_tokens must be an integer in [0, max_tokens]"),
        ({"prompt": "x", "max_tokens": 200}, "max_tokens", "context holds 128 tokens, but the request asks for 201 (1 in the prompt, 200 to generate)"),
        ({"prompt": "x", "max_tokens": 10**30}, "max_tokens", "context holds 128 tokens"),
        # Fields llmc does not implement are refused by name, never ignored.
        ({"prompt": "x", "suffix": "y"}, "suffix", "suffix: not supported by this server"),
        ({"prompt": "x", "response_format": {"type": "json_object", "strict": True}}, "response_format", "response_format.strict: not supported"),
        ({"prompt": "x", "guided_regex": "a+", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search", "not supported"),
        ('{"prompt": "x\\ud800y"}', "prompt", "surrogates not allowed at character 1 ('\\ud800'): not valid Unicode"),
        ('{"prompt": ["ok", "\\udfff"]}', "prompt", "not valid Unicode"),
        ('{"prompt": "x", "stop": "\\ud800"}', "stop", "not valid Unicode"),
        ('{"prompt": "x", "model": "\\ud800"}', "model", "not valid Unicode"),
    ],
)
def test_every_sampling_field_is_checked(server, body, param, message):
    r = post(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"messages": [{"role": "user", "content": "x\ud800"}]}, "messages", "messages.0.content: surrogates not allowed"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
         "content parts of type 'image_url' are not supported"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be an integer >= 1"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 500}, "max_tokens", "context holds 128 tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools", "tools: not supported by this server"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs", "[0, 20]"),
        ({"messages": []}, "messages", "at least 1 item"),
    ],
)
def test_chat_fields_are_checked(server, body, param, message):
    r = post(server, body, "/v1/chat/completions")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


@pytest.mark.parametrize(
    "extreme",
    [
        dict(temperature=1e-40),  # greedy, as any temperature below 1e-5
        dict(temperature=1e-5, top_p=1e-9),
        dict(temperature=1e300, min_p=1.0),
        dict(repetition_penalty=1e-38),
        dict(repetition_penalty=1e38, temperature=0.5),
        dict(presence_penalty=-2, frequency_penalty=-2, repetition_penalty=1e-30, temperature=1e-5),
        dict(logit_bias={str(t): 100 for t in range(320)}, temperature=3.0),
        dict(logit_bias={str(t): -100 for t in range(320)}),
        dict(seed=2**64 - 1, temperature=1.0),
        dict(seed=-(2**63), top_k=10**30),
    ],
)
def test_extreme_admitted_values_sample_and_leave_the_engine_well(server, client, expected, extreme):
    r = post(server, {"prompt": PROMPTS[3], "max_tokens": 8, **extreme})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server.url + "/health").status_code == 200
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert out.choices[0].text == expected[PROMPTS[0]]


def test_tiny_temperature_is_greedy(server, expected):
    r = post(server, {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 1e-40})
    assert r.json()["choices"][0]["text"] == expected[PROMPTS[0]]


def test_logit_bias(server, engine):
    greedy = LLM(engine).generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].token_ids
    forced = post(server, {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logit_bias": {"42": 100}, "logprobs": 0}).json()
    assert forced["usage"]["completion_tokens"] == 6
    tok = tokenizer()
    assert forced["choices"][0]["logprobs"]["tokens"] == [tok.decode([42])] * 6
    banned = post(server, {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logit_bias": {str(greedy[0]): -100}, "logprobs": 0}).json()
    assert banned["choices"][0]["logprobs"]["tokens"][0] != tok.decode([greedy[0]])


def test_chat_content_parts_are_concatenated(client):
    parts = [{"type": "text", "text": "def "}, {"type": "text", "text": "fib(n):"}]
    as_parts = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0)
    as_text = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "def fib(n):"}], max_tokens=8, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_a_prompt_list_runs_batched(server, expected):
    """16 prompts in one non-streaming request are in flight together: about max_tokens steps, not 16 x."""
    llm = server.llm
    steps = llm.num_steps
    r = post(server, {"prompt": [PROMPTS[i % 5] for i in range(16)], "max_tokens": 16, "temperature": 0})
    assert [c["text"] for c in r.json()["choices"]] == [expected[PROMPTS[i % 5]] for i in range(16)]
    assert llm.num_steps - steps < 3 * 16  # one after another would take 16 x 16 steps


def test_disconnected_client_aborts_its_requests(server):
    """A non-streaming client that goes away stops its requests within a step: the engine is idle, its KV blocks free."""
    llm = server.llm
    with pytest.raises(httpx.ReadTimeout):
        post(server, {"prompt": [PROMPTS[i % 5] for i in range(20)], "max_tokens": 100, "ignore_eos": True}, timeout=0.1)
    gone, done_when_gone = time.perf_counter(), llm.num_step_requests
    while llm.engine.has_unfinished_requests() or llm.engine.block_manager.usage:
        assert time.perf_counter() - gone < 0.5, "requests of a disconnected client still running"
        time.sleep(0.01)
    # Counted from the moment the client left, not from its request (how much ran before depends on the host's speed):
    # the 20 requests (100 steps each) stop within the few steps it takes their abort to reach the engine.
    assert llm.num_step_requests - done_when_gone < 20 * 100 / 4


def test_a_huge_prompt_does_not_stall_other_requests(server, expected):
    """While a 10 MB prompt is received, parsed and refused, /health and a stream in flight answer without a gap > 0.2 s."""
    body = json.dumps({"prompt": "def fib(n): " * 850_000, "max_tokens": 4}).encode()
    assert len(body) > 10_000_000

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def big():
                await asyncio.sleep(0.05)
                return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})

            async def health(done):
                gaps, last = [], time.perf_counter()
                while not done.is_set():
                    assert (await c.get("/health")).status_code == 200
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                return gaps

            async def stream():
                gaps, text, last = [], "", time.perf_counter()
                async with c.stream("POST", "/v1/completions", json={"prompt": PROMPTS[4], "max_tokens": 16, "temperature": 0, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                return gaps, text

            done = asyncio.Event()
            pings = asyncio.create_task(health(done))
            streamed = asyncio.create_task(stream())
            refused = await big()
            done.set()
            return refused, await pings, await streamed

    refused, health_gaps, (stream_gaps, text) = asyncio.run(main())
    assert refused.status_code == 400 and "characters" in refused.json()["error"]["message"]
    assert max(health_gaps) < 0.2 and len(health_gaps) > 3
    assert max(stream_gaps) < 0.2 and text == expected[PROMPTS[4]]


def test_request_body_limit(engine):
    """--max-request-bytes: a larger body gets 413 before it is parsed, by Content-Length or counted as it streams in."""
    llm = AsyncLLM(LLMEngine(engine))
    server = Server(build_app(llm, "tiny-llama", max_request_bytes=1 << 20))
    try:
        big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
        r = httpx.post(server.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

        def chunked():
            for i in range(0, len(big), 64 << 10):
                yield big[i:i + 64 << 10]

        r = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["error"]["message"]
        small = httpx.post(server.url + "/v1/completions", json={"prompt": "def", "max_tokens": 2})
        assert small.status_code == 200 and httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        llm.shutdown()


class PoisonedEngine(LLMEngine):
    """An engine whose processing of one kind of request (seed 666) raises after its third token, as a
    bug in sampling, detokenization or stop matching would: no value that validation admits does so."""

    def _finish_reason(self, seq, token, state):
        if seq.params.seed == 666 and len(seq.output_token_ids) == 3:
            raise RuntimeError("poisoned request")
        return super()._finish_reason(seq, token, state)


def test_a_request_that_fails_while_served_fails_alone(engine, expected):
    llm = AsyncLLM(PoisonedEngine(engine))
    server = Server(build_app(llm, "tiny-llama"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True)
        text = ""
        for i, chunk in enumerate(stream):
            text += chunk.choices[0].text if chunk.choices else ""
            if i == 1:  # while that stream is in flight: a poisoned request, non-streaming then streaming
                r = post(server, {"prompt": "def", "max_tokens": 8, "seed": 666})
                assert r.status_code == 500 and "RuntimeError: poisoned request" in r.json()["error"]["message"]
                lines = post(server, {"prompt": "def", "max_tokens": 8, "seed": 666, "stream": True}).text.split("\n\n")
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                assert "poisoned request" in events[-1]["error"]["message"] and "[DONE]" not in lines[-2]
                assert httpx.get(server.url + "/health").status_code == 200
        assert text == expected[PROMPTS[2]]
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.usage == 0
        assert client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=0).choices[0].text == expected[PROMPTS[0]]
    finally:
        server.stop()
        llm.shutdown()


def test_bad_requests_do_not_disturb_others(server, client, expected):
    """A stream in flight completes correctly while bad requests are refused around it."""
    stream = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True)
    text = ""
    for i, chunk in enumerate(stream):
        text += chunk.choices[0].text if chunk.choices else ""
        if i == 1:
            with pytest.raises(openai.BadRequestError):
                client.completions.create(model="tiny-llama", prompt="x", max_tokens=-3)
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="nope", prompt="x")
    assert text == expected[PROMPTS[2]]


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert httpx.get(server.url + "/health").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("llmc_num_requests_running", "llmc_num_requests_waiting", "llmc_kv_cache_usage_perc",
                 "llmc_prefix_cache_hit_rate", "llmc_time_to_first_token_seconds_count", "llmc_time_per_output_token_seconds_bucket"):
        assert name in metrics
    finished = [line for line in metrics.splitlines() if line.startswith('llmc_request_success_total{finished_reason="length"}')]
    assert finished and float(finished[0].split()[-1]) >= 1


def test_cli_serve_with_api_key(engine):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmc.cli", "serve", str(engine), "--port", str(port), "--api-key", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, timeout=60)
        denied = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny-llama", prompt="def", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_engine_failure_gives_503_not_a_hang(engine):
    """If a step fails (here: injected), waiting clients get an error and /health reports it."""
    llm = AsyncLLM(LLMEngine(engine))

    def broken(inputs):
        raise RuntimeError("injected failure")

    llm.engine.executor.submit = broken
    server = Server(build_app(llm, "tiny-llama"))
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "def", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and "injected failure" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "def", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503
    finally:
        server.stop()
        llm.shutdown()


def test_n_choices_and_streaming_n(client, expected):
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[:2], max_tokens=16, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [expected[PROMPTS[0]]] * 2 + [expected[PROMPTS[1]]] * 2
    assert out.usage.completion_tokens == 4 * 16
    # Samples that end at different steps (stop strings): each one's chunks, and its finish once.
    sampled = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=5, n=3, stop=["e", "a"])
    assert len({c.text for c in sampled.choices}) > 1  # each sample draws its own tokens
    assert len({c.finish_reason for c in sampled.choices}) > 1 or len({len(c.text) for c in sampled.choices}) > 1
    texts, finishes = {}, []
    for chunk in client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=5, n=3,
                                           stop=["e", "a"], stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            finishes += [c.index] if c.finish_reason else []
    assert [texts[i] for i in range(3)] == [c.text for c in sampled.choices]  # seeded: the same samples
    assert sorted(finishes) == [0, 1, 2]
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content == chat.choices[1].message.content


def test_best_of_returns_the_likeliest_and_shares_the_prompt(server, client):
    prompt = list(range(3, 60))  # three full KV blocks of 16
    blocks = server.llm.engine.block_manager
    hits = blocks.prefix_cache_hits
    every = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=4, logprobs=0)
    # The first sample computes the prompt; the other three share its full blocks.
    assert blocks.prefix_cache_hits - hits >= 3 * 48
    totals = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=2, best_of=4, logprobs=0)
    ranked = sorted(range(4), key=lambda i: -totals[i])
    assert [c.text for c in best.choices] == [every.choices[i].text for i in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]


def test_echo_with_prompt_logprobs_matches_transformers(server, checkpoints):
    """What lm-evaluation-harness's loglikelihood reads: echo, logprobs and max_tokens 0 or 1."""
    from transformers import AutoModelForCausalLM

    prompt = tokenizer()("def fib(n):\n    return fib(n - 1)")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    want = [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    for max_tokens in (0, 1):
        r = post(server, {"prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": 1, "temperature": 0}).json()
        [choice] = r["choices"]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(prompt) + max_tokens and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(prompt)] == pytest.approx(want, abs=1e-4)
        assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-6 for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
        assert choice["text"].startswith(tokenizer().decode(prompt)) and r["usage"]["prompt_tokens"] == len(prompt)
    echoed = post(server, {"prompt": PROMPTS[0], "max_tokens": 4, "echo": True, "temperature": 0}).json()["choices"][0]
    assert echoed["text"].startswith(PROMPTS[0]) and echoed["logprobs"] is None


def test_stop_strings_and_min_tokens(server, client, expected):
    text = expected[PROMPTS[0]]
    stop = text[4:7]
    cut = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    kept = post(server, {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": stop, "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == text[: text.index(stop) + len(stop)]
    late = post(server, {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "stop": text[:2], "min_tokens": 8}).json()
    assert late["choices"][0]["text"].startswith(text[:2]) and late["usage"]["completion_tokens"] >= 8  # not stopped before 8 tokens


def test_chat_default_max_tokens_is_the_rest_of_the_context(client):
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "def fib(n):"}], temperature=0)
    assert out.choices[0].finish_reason == "length"  # the tiny model has no EOS: it fills the context
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 128


def test_tokenize_detokenize_version(server, engine):
    tok = LLM(engine).tokenizer
    r = post(server, {"prompt": "def fib(n):"}, "/tokenize").json()
    assert r["tokens"] == tok("def fib(n):")["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, {"messages": messages, "return_token_strs": True}, "/tokenize").json()
    assert chat["tokens"] == tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert chat["token_strs"] == tok.convert_ids_to_tokens(chat["tokens"])
    assert post(server, {"tokens": r["tokens"]}, "/detokenize").json() == {"prompt": "def fib(n):"}
    bad = post(server, {"tokens": [99999]}, "/detokenize")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert post(server, {"prompt": "x", "unknown": 1}, "/tokenize").status_code == 400
    assert httpx.get(server.url + "/version").json() == {"version": llmc.__version__}


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `llmc serve` (proc, its stderr piped) answers /health; its stderr if it exits first."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
