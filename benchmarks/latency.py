"""`llmc bench latency`: decode speed at batch 1 and batch 8, and prefill time, for an engine and
for the same model through Hugging Face transformers, in the same run; prints JSON with the ratios.

Method (as in ../shared/PLATFORM.md's table): greedy, random 32-token prompts, 128 new tokens, EOS
ignored; tokens/s is new tokens over the wall time of the whole call, median of --repeats runs after
a warm-up. Prefill is the time to the first token of one 512-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_llmc(engine: str, prompts: dict, new_tokens: int, repeats: int) -> dict:
    from llmc import LLM, SamplingParams

    llm = LLM(engine, enable_prefix_caching=False)  # repeats must not hit the cache
    decode = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    return {
        "batch1_tokens_per_s": new_tokens / median_seconds(lambda: llm.generate(prompts["one"], decode), repeats),
        "batch8_tokens_per_s": 8 * new_tokens / median_seconds(lambda: llm.generate(prompts["eight"], decode), repeats),
        "prefill_512_ms": 1000 * median_seconds(lambda: llm.generate(prompts["long"], first), repeats),
    }


def bench_hf(model_dir: str, dtype: str, prompts: dict, new_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def run(batch, n):
        with torch.no_grad():
            model.generate(torch.tensor(batch), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    return {
        "batch1_tokens_per_s": new_tokens / median_seconds(lambda: run(prompts["one"], new_tokens), repeats),
        "batch8_tokens_per_s": 8 * new_tokens / median_seconds(lambda: run(prompts["eight"], new_tokens), repeats),
        "prefill_512_ms": 1000 * median_seconds(lambda: run(prompts["long"], 1), repeats),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--hf-model", help="HF checkpoint for the reference [default: the one the engine was built from]")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args(argv)

    from llmc.engine import EngineConfig

    config = EngineConfig.load(args.engine)
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, config.vocab_size, (n,), generator=g).tolist()

    prompts = {"one": [prompt(32)], "eight": [prompt(32) for _ in range(8)], "long": [prompt(512)]}
    result = {
        "workload": {"prompt_tokens": 32, "new_tokens": args.new_tokens, "prefill_tokens": 512,
                     "dtype": config.dtype, "threads": torch.get_num_threads()},
        "llmc": bench_llmc(args.engine, prompts, args.new_tokens, args.repeats),
    }
    if not args.no_hf:
        hf = bench_hf(args.hf_model or config.build["source"], config.dtype, prompts, args.new_tokens, args.repeats)
        result["hf"] = hf
        ours = result["llmc"]
        result["ratios"] = {
            "batch1_llmc_over_hf": ours["batch1_tokens_per_s"] / hf["batch1_tokens_per_s"],
            "batch8_llmc_over_hf": ours["batch8_tokens_per_s"] / hf["batch8_tokens_per_s"],
            "prefill_hf_over_llmc": hf["prefill_512_ms"] / ours["prefill_512_ms"],
        }
    result = json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 3))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
