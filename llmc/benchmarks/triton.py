"""`llmc bench triton`: the same concurrent requests through Triton Inference Server (the repository
`llmc triton` writes, on the server in the nvidia-pytriton wheel) and through `llmc serve`, and
how long each server takes from start until it is ready. Prints JSON.

Every request is greedy, so both servers generate the same tokens (the JSON says whether they did);
throughput is output tokens over the wall time from the first request sent to the last answered,
the median of --rounds rounds (these are shared, noisy machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["def read_config(path):", "class Queue:\n    def __init__(self):", "import os\nimport sys\n\ndef main():",
           "    for line in lines:", "def fib(n):", "class Error(Exception):", "    return self._data[", "try:\n    import"]


def triton_answer(body: dict) -> tuple[str, int]:
    ids = body["output_ids"]  # the generate endpoint writes a one-element tensor as its element
    return body["text_output"], len(ids) if isinstance(ids, list) else 1


def openai_answer(body: dict) -> tuple[str, int]:
    return body["choices"][0]["text"], body["usage"]["completion_tokens"]


def run_rounds(url: str, bodies: list[dict], answer, rounds: int) -> dict:
    runs = sorted((run_requests(url, bodies, answer) for _ in range(rounds)), key=lambda run: run["seconds"])
    return runs[len(runs) // 2]


def run_requests(url: str, bodies: list[dict], answer) -> dict:
    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            start = time.perf_counter()
            responses = await asyncio.gather(*(client.post(url, json=b) for b in bodies))
            return responses, time.perf_counter() - start

    responses, seconds = asyncio.run(main())
    for r in responses:
        r.raise_for_status()
    texts, tokens = zip(*(answer(r.json()) for r in responses))
    return {"seconds": seconds, "texts": list(texts), "tokens": sum(tokens)}


def summarize(load_seconds: float, run: dict) -> dict:
    tokens = run["tokens"]
    return {"load_seconds": round(load_seconds, 2), "seconds": round(run["seconds"], 3), "output_tokens": tokens,
            "throughput_tokens_per_s": round(tokens / run["seconds"], 1)}


def bench_triton(engine: str, prompts: list[str], new_tokens: int, rounds: int) -> tuple[float, dict]:
    from llmc.runtime.triton import TritonServer, write_repository

    with tempfile.TemporaryDirectory() as tmp:
        with TritonServer(write_repository(engine, Path(tmp) / "repository")) as server:
            url = f"http://{server.http_url}/v2/models/ensemble/generate"
            run_requests(url, [{"text_input": prompts[0], "max_tokens": 2}], triton_answer)  # warm-up
            run = run_rounds(url, [{"text_input": p, "max_tokens": new_tokens} for p in prompts], triton_answer, rounds)
            return server.load_seconds, run


def bench_llmc_serve(engine: str, prompts: list[str], new_tokens: int, rounds: int) -> tuple[float, dict]:
    from llmc.runtime.executor import free_port

    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "llmc.cli", "serve", engine, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llmc serve exited with status {server.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        load_seconds = time.perf_counter() - start
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"max_tokens": new_tokens, "temperature": 0}
        run_requests(url, [{"prompt": prompts[0], "max_tokens": 2}], openai_answer)  # warm-up
        return load_seconds, run_rounds(url, [{"prompt": p, **body} for p in prompts], openai_answer, rounds)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench triton", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--requests", type=int, default=32, help="requests sent at once")
    ap.add_argument("--new-tokens", type=int, default=64, help="max_tokens of each request (greedy; EOS ends one sooner)")
    ap.add_argument("--rounds", type=int, default=5, help="times the requests are sent; the median counts")
    args = ap.parse_args(argv)

    prompts = [PROMPTS[i % len(PROMPTS)] + "\n" * (i // len(PROMPTS)) for i in range(args.requests)]
    triton_load, triton_run = bench_triton(args.engine, prompts, args.new_tokens, args.rounds)
    serve_load, serve_run = bench_llmc_serve(args.engine, prompts, args.new_tokens, args.rounds)
    result = {
        "workload": {"requests": args.requests, "max_tokens": args.new_tokens, "concurrent": True, "greedy": True, "rounds": args.rounds},
        "triton": summarize(triton_load, triton_run),
        "llmc_serve": summarize(serve_load, serve_run),
        "same_text": triton_run["texts"] == serve_run["texts"],
    }
    result["throughput_triton_over_llmc_serve"] = round(
        result["triton"]["throughput_tokens_per_s"] / result["llmc_serve"]["throughput_tokens_per_s"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
