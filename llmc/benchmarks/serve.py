"""`llmc bench serve`: replay a request trace through llmc's in-flight batching and through Hugging
Face transformers with static batching, in the same run, and print JSON with the ratios.

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
import random
import sys
import time
from pathlib import Path

import torch


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
                           "output_len": args.output_len, "threads": torch.get_num_threads()}}
    result["llmc"] = asyncio.run(run_llmc(args.engine, trace))
    if not args.no_hf:
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
