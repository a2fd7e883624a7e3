"""`llmc bench offline`: the same requests offline (`LLM.generate` in this process, as `llmc
generate` runs them) and served (`llmc serve` on loopback, the requests sent at once), first
without and then with a busy process (`while True: pass`) that keeps a core busy; prints JSON with
the offline/served ratios.

Every request is greedy with EOS ignored, so both generate the same tokens. Throughput is output
tokens over the wall time of all requests, the median of --rounds rounds, offline and served
alternating. The server and the busy process are started and stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


@contextlib.contextmanager
def busy_process():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def http_server(name: str, command: list[str], port: int, ready_timeout: float, env: dict | None = None):
    """Run COMMAND (a server listening on loopback PORT) until /health answers; yields its base URL, then stops it.
    Its output goes to a temporary file, whose tail a failure to start shows."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    why = f"exited with status {proc.returncode}" if proc.returncode is not None else f"was not ready within {ready_timeout:g} s"
                    raise RuntimeError(f"{name} {why}; its output ended with:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def server(engine: str, ready_timeout: float):
    """`llmc serve ENGINE` on a free loopback port; yields its completions URL."""
    from llmc.runtime.executor import free_port

    port = free_port()
    with http_server("llmc serve", [sys.executable, "-m", "llmc.cli", "serve", engine, "--port", str(port)], port, ready_timeout) as url:
        yield f"{url}/v1/completions"


def offline_run(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    from llmc import SamplingParams

    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - start, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def served_run(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            start = time.perf_counter()
            responses = await asyncio.gather(*(
                client.post(url, json={"prompt": p, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
                for p in prompts
            ))
            return time.perf_counter() - start, responses

    seconds, responses = asyncio.run(main())
    for r in responses:
        r.raise_for_status()
    return seconds, sum(r.json()["usage"]["completion_tokens"] for r in responses)


def measure(llm, url: str, prompts: list[list[int]], new_tokens: int, rounds: int) -> dict:
    runs = {"offline": [], "served": []}
    for _ in range(rounds):
        runs["offline"].append(offline_run(llm, prompts, new_tokens))
        runs["served"].append(served_run(url, prompts, new_tokens))
    result = {}
    expected = len(prompts) * new_tokens
    for name, rs in runs.items():
        if any(tokens != expected for _, tokens in rs):
            raise RuntimeError(f"{name} generated {[t for _, t in rs]} tokens in its rounds, not {expected} each")
        result[f"{name}_tokens_per_s"] = expected / statistics.median(seconds for seconds, _ in rs)
    result["offline_over_served"] = result["offline_tokens_per_s"] / result["served_tokens_per_s"]
    return result


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench offline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--requests", type=int, default=1, help="requests in flight together")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="times each is measured; the median counts")
    ap.add_argument("--ready-timeout", type=float, default=120.0, help="seconds the server may take to start")
    args = ap.parse_args(argv)

    from llmc import LLM
    from llmc.engine import EngineConfig

    rng = random.Random(0)
    vocab = EngineConfig.load(args.engine).vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    result: dict = {
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "cpu": cpu_model(), "cpus": os.cpu_count(),
                     "load_average_1min": os.getloadavg()[0],  # others' work on a shared machine
                     **{var: os.environ.get(var) for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}},
    }
    with LLM(args.engine) as llm, server(args.engine, args.ready_timeout) as url:
        offline_run(llm, prompts[:1], 4)  # warm-ups
        served_run(url, prompts[:1], 4)
        result["without_busy_process"] = measure(llm, url, prompts, args.new_tokens, args.rounds)
        with busy_process():
            result["with_busy_process"] = measure(llm, url, prompts, args.new_tokens, args.rounds)
    result = json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 3))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
