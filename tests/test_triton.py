"""`llmc triton`: the generated model repository, served by a real Triton Inference Server on loopback
(the server in the nvidia-pytriton wheel; `pip install -e '.[triton]'`), queried over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the Triton tests need the triton extra: pip install -e '.[triton]'")
pytest.importorskip("pytriton", reason="the Triton tests need the triton extra: pip install -e '.[triton]'")

import tritonclient.grpc as grpcclient  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

import llmc  # noqa: E402
from llmc import LLM, SamplingParams  # noqa: E402
from llmc.runtime.triton import TritonServer, write_repository  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["def fib(n):", "import os\nimport sys\n", "class A:", "The quick brown fox", "return fib(n - 1) +"]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return llmc.build(checkpoints["llama"], tmp_path_factory.mktemp("e") / "tiny-llama", max_seq_len=128, max_batch_tokens=64,
                      log=lambda _: None)


@pytest.fixture(scope="module")
def repository(engine, tmp_path_factory):
    """Written by the command a user runs, engine copied in."""
    repo = tmp_path_factory.mktemp("r") / "model_repository"
    subprocess.run([sys.executable, "-m", "llmc.cli", "triton", str(engine), "-o", str(repo), "--max-batch-size", "48",
                    "--instances", "2", "--copy-engine"], check=True, capture_output=True)
    return repo


@pytest.fixture(scope="module")
def server(repository):
    with TritonServer(repository) as server:
        yield server


@pytest.fixture(scope="module")
def llm(engine):
    with LLM(engine) as llm:
        yield llm


def generate(server, timeout=120, **body) -> httpx.Response:
    return httpx.post(f"http://{server.http_url}/v2/models/ensemble/generate", json=body, timeout=timeout)


def generate_stream(server, **body) -> list[dict]:
    events = []
    with httpx.stream("POST", f"http://{server.http_url}/v2/models/ensemble/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def grpc_stream(server, prompt: str, max_tokens: int) -> list:
    """The ensemble's responses to one request over a gRPC stream, the final one last."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = [grpcclient.InferInput("text_input", [1, 1], "BYTES"), grpcclient.InferInput("max_tokens", [1, 1], "INT32"),
              grpcclient.InferInput("stream", [1, 1], "BOOL")]
    inputs[0].set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([[True]]))
    try:
        client.async_stream_infer("ensemble", inputs, enable_empty_final_response=True)
        results = []
        while True:
            result, error = responses.get(timeout=120)
            assert error is None, error
            if result.get_output("text_output") is not None:
                results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results
    finally:
        client.stop_stream()
        client.close()


def ids(body: dict) -> list[int]:
    """A response's output_ids (the generate endpoint writes a one-element tensor as its element)."""
    value = body["output_ids"]
    return value if isinstance(value, list) else [value]


def metric(server, name: str) -> float:
    text = httpx.get(server.metrics_url).text
    return float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


def test_every_config_is_valid_against_tritons_schema(repository, engine):
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert (path.parent / "1").is_dir()  # a versioned model folder
    assert set(configs) == {"ensemble", "preprocessing", "llmc", "postprocessing"}
    llmc_model = configs["llmc"]
    assert llmc_model.model_transaction_policy.decoupled and llmc_model.max_batch_size == 48
    assert configs["preprocessing"].instance_group[0].count == 2
    assert llmc_model.parameters["engine_dir"].string_value == "1/engine"  # --copy-engine
    assert (repository / "llmc" / "1" / "engine" / "config.json").read_bytes() == (engine / "config.json").read_bytes()
    ensemble = configs["ensemble"]
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["preprocessing", "llmc"]
    names = {i.name for i in ensemble.input}
    assert {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "end_id", "stop_words", "bad_words"} <= names
    assert [o.name for o in ensemble.output][0] == "text_output"
    for step in ensemble.ensemble_scheduling.step:  # every mapped tensor exists on the model it maps to
        model = configs[step.model_name]
        assert set(step.input_map) <= {i.name for i in model.input}
        assert set(step.output_map) <= {o.name for o in model.output}


def test_repository_refuses_bad_options(engine, tmp_path):
    with pytest.raises(ValueError, match="model name"):
        write_repository(engine, tmp_path / "a", name="ensemble")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        write_repository(engine, tmp_path / "b")


def test_generate_returns_what_llm_generate_does(server, llm):
    expected = llm.generate(PROMPTS, GREEDY)
    for prompt, want in zip(PROMPTS, expected):
        r = generate(server, text_input=prompt, max_tokens=24)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text_output"] == want.outputs[0].text and body["output_ids"] == want.outputs[0].token_ids
        assert body["finish_reason"] == "length"


def test_generate_stream_yields_each_token_in_order(server, llm):
    want = llm.generate(PROMPTS[0], GREEDY)[0]
    events = generate_stream(server, text_input=PROMPTS[0], max_tokens=24, stream=True)
    assert len(events) == 24  # one event per token
    assert [e["output_ids"] for e in events] == want.outputs[0].token_ids  # (the JSON of a one-element tensor is its element)
    assert "".join(e["text_output"] for e in events) == want.outputs[0].text
    assert events[-1]["finish_reason"] == "length" and all(e["finish_reason"] == "" for e in events[:-1])
    # Without "stream", generate_stream answers once, with everything.
    [single] = generate_stream(server, text_input=PROMPTS[0], max_tokens=24)
    assert single["text_output"] == want.outputs[0].text


def test_grpc_streaming_yields_each_token_in_order(server, llm):
    want = llm.generate(PROMPTS[1], GREEDY)[0]
    results = grpc_stream(server, PROMPTS[1], 24)
    assert [r.as_numpy("output_ids").reshape(-1).tolist() for r in results] == [[t] for t in want.outputs[0].token_ids]
    assert "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in results) == want.outputs[0].text


def test_sampling_stop_words_and_bad_words_map_onto_llmc(server, llm):
    tok = llm.tokenizer
    base = llm.generate(PROMPTS[2], GREEDY)[0]
    stop = base.outputs[0].text[6:9]
    r = generate(server, text_input=PROMPTS[2], max_tokens=24, stop_words=[stop]).json()
    assert r["text_output"] == llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0].outputs[0].text
    assert r["finish_reason"] == "stop" and stop not in r["text_output"]

    word = tok.decode(base.outputs[0].token_ids[3:4])
    r = generate(server, text_input=PROMPTS[2], max_tokens=24, bad_words=[word]).json()
    banned = [tok(word, add_special_tokens=False)["input_ids"]]
    assert r["output_ids"] == llm.generate(PROMPTS[2], SamplingParams(max_tokens=24, temperature=0, bad_words_ids=banned))[0].outputs[0].token_ids
    assert r["output_ids"] != base.outputs[0].token_ids

    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    r = generate(server, text_input=PROMPTS[3], max_tokens=16, temperature=0.8, top_k=40, top_p=0.9, random_seed=7).json()
    assert r["output_ids"] == llm.generate(PROMPTS[3], sampled)[0].outputs[0].token_ids  # seeded: reproducible in any batch

    end_id = base.outputs[0].token_ids[4]
    r = generate(server, text_input=PROMPTS[2], max_tokens=24, end_id=end_id).json()
    assert ids(r) == base.outputs[0].token_ids[: base.outputs[0].token_ids.index(end_id) + 1] and r["finish_reason"] == "stop"


def test_32_concurrent_requests_are_batched_in_flight(server, llm):
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(32)]
    expected = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    steps, advanced = metric(server, "llmc_steps"), metric(server, "llmc_step_requests")

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            url = f"http://{server.http_url}/v2/models/ensemble/generate"
            return await asyncio.gather(*(client.post(url, json={"text_input": p, "max_tokens": 32}) for p in prompts))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.json()["output_ids"] for r in responses] == [o.outputs[0].token_ids for o in expected]
    steps, advanced = metric(server, "llmc_steps") - steps, metric(server, "llmc_step_requests") - advanced
    assert advanced == 32 * 32  # every token of every request came from a step
    # Served one at a time, each step advances exactly one request. How many share a step depends on how
    # fast the ensemble's tokenizer hands requests over against how fast the engine steps: about 25 on a
    # quiet host, 6.4 seen beside a busy test worker; 2 still proves batching and leaves that margin.
    assert advanced / steps >= 2, f"{steps} steps advanced {advanced} requests: not batched in flight"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": 8}, "text_input"),
        ({"text_input": "def f():", "max_tokens": -1}, "max_tokens must be an integer >= 0, got -1"),
        ({"text_input": "def f():", "max_tokens": 8, "top_p": 2.0}, "top_p must be in (0, 1]"),
        ({"text_input": "", "max_tokens": 8}, "prompt is empty"),
        ({"text_input": "x " * 300, "max_tokens": 8}, "at most 128 tokens"),
        ({"text_input": "def f():", "max_tokens": 8, "top_k": -5}, "top_k must be an integer >= 1"),
    ],
)
def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(server, llm, body, message):
    r = generate(server, **body)
    assert r.status_code >= 400 and message in r.json()["error"]
    ok = generate(server, text_input=PROMPTS[4], max_tokens=8)
    assert ok.status_code == 200 and ok.json()["text_output"] == llm.generate(PROMPTS[4], SamplingParams(max_tokens=8, temperature=0))[0].outputs[0].text


def test_postprocessing_detokenizes_token_ids(server, llm):
    ids = llm.generate(PROMPTS[0], GREEDY)[0].outputs[0].token_ids
    r = httpx.post(f"http://{server.http_url}/v2/models/postprocessing/generate", json={"TOKENS_BATCH": ids}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["OUTPUT"] == llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_tp2_pp2_engine_behind_the_repository(checkpoints, llm, tmp_path):
    """The model starts the engine's four rank processes; stopping the server stops them."""
    engine = llmc.build(checkpoints["llama"], tmp_path / "tp2pp2", max_seq_len=128, tp=2, pp=2, log=lambda _: None)
    repository = write_repository(engine, tmp_path / "repo")
    with TritonServer(repository) as server:
        expected = llm.generate(PROMPTS, GREEDY)
        for prompt, want in zip(PROMPTS, expected):
            assert generate(server, text_input=prompt, max_tokens=24).json()["output_ids"] == want.outputs[0].token_ids
        events = generate_stream(server, text_input=PROMPTS[0], max_tokens=24, stream=True)
        assert "".join(e["text_output"] for e in events) == expected[0].outputs[0].text
        group = server.process.pid
        assert len(live_processes(group)) >= 9  # the server, 3 stubs, the forkserver, 4 ranks
    deadline = time.monotonic() + 10
    while live_processes(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes(group) == []  # no process of the server's is left


def live_processes(group: int) -> list[int]:
    """The processes of a process group that are not zombies."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
