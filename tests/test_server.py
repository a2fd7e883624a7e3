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


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    ckpt = shutil.copytree(checkpoints["llama"], tmp_path_factory.mktemp("c") / "llama")
    tok = tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(ckpt)
    return llmc.build(ckpt, tmp_path_factory.mktemp("e") / "tiny-llama", max_seq_len=128, max_batch_tokens=64, log=lambda _: None)


@pytest.fixture(scope="module")
def server(engine):
    llm = AsyncLLM(LLMEngine(engine))
    server = Server(build_app(llm, "tiny-llama"))
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
    return {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0)))}


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
    want = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0))[0].text
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
        (json.dumps({"prompt": "x", "max_tokens": -1}), 400, "max_tokens must be an integer >= 1"),
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
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
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
