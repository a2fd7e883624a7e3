"""Failure is loud and ends cleanly: `llmc serve` of a real tp2 engine whose rank is killed or stopped,
or which is told to stop (SIGTERM), with streams open; client disconnects; the pp-wide max_num_seqs cap.

Each server is a real `python3 -m llmc.cli serve` process; every process a test starts is killed in
its `finally`, also when the test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

import llmc
from llmc import SamplingParams
from llmc.runtime.api_server import Server, build_app
from llmc.runtime.async_llm import AsyncLLM, EngineDeadError
from llmc.runtime.executor import free_port
from llmc.runtime.llm_engine import LLMEngine

from conftest import make_checkpoint

LONG = {"prompt": "def fib(n):", "max_tokens": 400, "temperature": 0}  # seconds of steps: still running when the fault comes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("c") / "llama", seed=1)


@pytest.fixture(scope="module")
def tp2_engine(checkpoint, tmp_path_factory):
    return llmc.build(checkpoint, tmp_path_factory.mktemp("e") / "tp2", max_seq_len=512, max_batch_tokens=64, tp=2, log=lambda _: None)


def _children(pid: int) -> list[int]:
    """pid's child processes, oldest first."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append((int(stat[19]), int(entry)))  # start time, pid
    return [p for _, p in sorted(found)]


def _gone(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@contextmanager
def llmc_serve(engine, *args):
    """`llmc serve ENGINE ARGS` on a free loopback port: yields (process, url, rank pids in rank order)."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
    server = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", str(engine), "--port", str(port), *args],
                              stdout=log, stderr=log, text=True)
    server.log = log
    started = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None and time.monotonic() < deadline, f"server did not start: {_log(server)}"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        started = [pid for child in _children(server.pid) for pid in [child, *_children(child)]]
        forkserver = next(p for p in _children(server.pid) if b"forkserver" in open(f"/proc/{p}/cmdline", "rb").read())
        yield server, url, _children(forkserver)
    finally:
        for pid in [server.pid, *started]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.wait(timeout=30)
        log.close()


def _log(server) -> str:
    server.log.seek(0)
    return server.log.read()[-3000:]


class Stream:
    """A streaming completion read on a thread: its SSE data payloads, and when it ended."""

    def __init__(self, url: str, body: dict):
        self.events: list[str] = []
        self.started = threading.Event()
        self.ended_at = None
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url, body):
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line.removeprefix("data: "))
                        self.started.set()
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def error(self) -> str:
        """The error event that must end the stream: its message."""
        self.thread.join(timeout=30)
        assert self.ended_at is not None, "the stream is still open"
        assert self.events and "[DONE]" not in self.events, self.events[-3:]
        error = json.loads(self.events[-1])["error"]
        assert error["type"] == "server_error"
        return error["message"]


def _exits(server, within: float) -> int:
    try:
        return server.wait(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server is still running {within:g} s later: {_log(server)}")


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_failed_rank_ends_every_stream_with_an_error_and_the_server_exits(fault, tp2_engine):
    """kill -9, or SIGSTOP with --rank-timeout: streams get an error event naming the rank, a request in
    flight gets a 5xx, and `llmc serve` exits with status 1 leaving no rank behind."""
    rank_timeout = 3.0
    with llmc_serve(tp2_engine, "--rank-timeout", str(rank_timeout)) as (server, url, ranks):
        assert len(ranks) == 2
        streams = [Stream(url, LONG) for _ in range(4)]
        result = {}
        plain = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=LONG, timeout=60)))
        plain.start()
        for s in streams:
            assert s.started.wait(60) and s.ended_at is None, "the stream did not start"
        victim = ranks[1]  # not the rank that returns the logits: the one the driver waits on
        os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        start = time.monotonic()
        named = f"rank 1 (pid {victim}) was killed by SIGKILL" if fault == "kill" else f"rank 1 (pid {victim}, stopped"
        for s in streams:
            assert named in s.error()
            assert s.ended_at - start < (5 if fault == "kill" else rank_timeout + 5)
        plain.join(timeout=30)
        assert result["r"].status_code == 503 and named in result["r"].json()["error"]["message"]
        assert _exits(server, within=15) == 1
        assert "the engine stopped after an error" in _log(server)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in ranks if not _gone(pid)] == []


def test_a_rank_that_dies_between_requests_stops_the_server(tp2_engine):
    with llmc_serve(tp2_engine) as (server, url, ranks):
        os.kill(ranks[0], signal.SIGKILL)
        assert _exits(server, within=15) == 1
        assert f"rank 0 (pid {ranks[0]}) was killed by SIGKILL" in _log(server)


def test_sigterm_drains_for_at_most_the_shutdown_timeout(tp2_engine):
    """Short requests finish, new ones get 503, long ones end with an error at the timeout; exit status 0."""
    shutdown_timeout = 2.0
    with llmc_serve(tp2_engine, "--shutdown-timeout", str(shutdown_timeout)) as (server, url, ranks):
        long = [Stream(url, LONG) for _ in range(3)]
        for s in long:
            assert s.started.wait(60)
        short = Stream(url, {**LONG, "max_tokens": 8})
        assert short.started.wait(60)
        server.send_signal(signal.SIGTERM)
        start = time.monotonic()
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/completions", json=LONG, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503
        assert _exits(server, within=shutdown_timeout + 15) == 0
        assert time.monotonic() - start < shutdown_timeout + 15
        short.thread.join(timeout=10)
        assert short.events[-1] == "[DONE]"
        for s in long:
            assert "--shutdown-timeout 2 s" in s.error()
            assert s.ended_at - start < shutdown_timeout + 3
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in ranks if not _gone(pid)] == []


def test_max_num_seqs_caps_the_pipeline_schedulers_together(checkpoint, tmp_path):
    engine = LLMEngine(llmc.build(checkpoint, tmp_path / "pp2", max_seq_len=64, pp=2, log=lambda _: None), max_num_seqs=3)
    try:
        for i in range(8):
            engine.add_request([1, 2, 3 + i], SamplingParams(max_tokens=6, temperature=0))
        most = 0
        while engine.has_unfinished_requests():
            engine.step()
            most = max(most, sum(len(s.running) for s in engine.schedulers))
        assert most == 3
    finally:
        engine.shutdown()


class ThreadedServer:
    """The server's own `Server` (uvicorn) on a thread of this process, so that a test can look inside the engine."""

    def __init__(self, llm: AsyncLLM):
        self.app = build_app(llm, "tiny")
        self.port = free_port()
        self.server = Server(llm, self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self):
        try:
            self.server.run()
        except EngineDeadError as e:
            self.error = e

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_disconnected_stream_is_aborted_within_a_step_and_metrics_count_outcomes(checkpoint, tmp_path):
    """A client that goes away mid-stream frees its KV blocks at once; /metrics counts preemptions (a KV
    cache of one request's size, four requests) and how requests ended: length, abort, error."""
    engine_dir = llmc.build(checkpoint, tmp_path / "tp1", max_seq_len=128, max_batch_tokens=64, log=lambda _: None)
    llm = AsyncLLM(LLMEngine(engine_dir, kv_cache_tokens=128))
    step = llm.engine.step

    def step_of_a_real_models_length():  # the tiny model's step, about a millisecond, is shorter than a switch of
        time.sleep(0.02)  # Python's threads: on a busy host the server's thread saw the disconnect 95 steps late
        return step()

    llm.engine.step = step_of_a_real_models_length
    server = ThreadedServer(llm)
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "max_tokens": 100, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert llm.engine.block_manager.usage > 0
            steps = llm.num_steps
        deadline = time.monotonic() + 10
        while llm.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not llm.engine.has_unfinished_requests() and llm.engine.block_manager.usage == 0
        assert llm.num_steps - steps <= 2  # the step under way, and at most the one whose output found the client gone
        llm.engine.step = step

        threads = [threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                    kwargs={"json": {**LONG, "max_tokens": 60}, "timeout": 60}) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        metrics = httpx.get(server.url + "/metrics").text
        assert _metric(metrics, "llmc_num_preemptions_total") >= 1
        assert _metric(metrics, 'llmc_request_success_total{finished_reason="length"}') == 4
        assert _metric(metrics, 'llmc_request_success_total{finished_reason="abort"}') == 1

        def broken(inputs):
            raise RuntimeError("injected failure")

        llm.engine.executor.submit = broken
        stream = Stream(server.url, {**LONG, "max_tokens": 100})  # within the 128-token context
        assert "injected failure" in stream.error()
        server.thread.join(timeout=15)
        assert not server.thread.is_alive(), "the server did not stop after the engine failed"
        assert "injected failure" in str(server.error)
        metrics = server.app.state.metrics.render().decode()
        assert _metric(metrics, 'llmc_request_success_total{finished_reason="error"}') == 1
    finally:
        server.stop()
        llm.shutdown()
