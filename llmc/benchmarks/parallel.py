"""`llmc bench parallel MODEL`: how build time, per-rank memory and throughput scale with tp and pp.

For each mapping (`--mappings 1x1,2x1,1x2,2x2`, tp x pp) the model is built in a child process
(wall time and peak RSS of that process), then served by `LLM` with one process per rank: a batch
of `--requests` random prompts of `--prompt-len` tokens, `--new-tokens` each, greedy, EOS ignored,
after a warm-up. Reported per mapping: the largest rank's weight file and resident memory, and
output tokens/s; ratios against tp=1 x pp=1 and against Hugging Face transformers' `generate` on
the same batch, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


# Builds in a child process, which prints its own peak RSS (VmHWM: unlike rusage, not the parent's at fork).
BUILD = """
import sys
from llmc.cli import main
main(sys.argv[1:], standalone_mode=False)
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def build(model: str, out: Path, tp: int, pp: int, dtype: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, "build", model, "-o", str(out), "--tp", str(tp), "--pp", str(pp), "--dtype", dtype],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"building tp={tp} pp={pp} failed:\n{proc.stderr[-2000:]}")
    peak_kb = int(proc.stdout.split()[-1])
    return {"build_seconds": time.perf_counter() - start, "build_peak_rss_gb": peak_kb / 2**20}


def rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def serve(engine: Path, prompts: list[list[int]], new_tokens: int) -> dict:
    from llmc import LLM, SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    with LLM(engine, enable_prefix_caching=False, max_num_seqs=len(prompts)) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        procs = getattr(llm.engine.executor, "procs", [])
        pids = [p.pid for p in procs] or [os.getpid()]
        rss = [rss_gb(pid) for pid in pids]
    weights = [f.stat().st_size for f in engine.glob("rank*/weights.safetensors")]
    return {
        "tokens_per_s": sum(len(c.token_ids) for o in outputs for c in o.outputs) / seconds,
        "max_rank_weights_mb": max(weights) / 1e6,
        "max_rank_rss_gb": max(rss),
        "total_rss_gb": sum(rss),
    }


def hf_tokens_per_s(model: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    batch = torch.tensor(prompts)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        hf.generate(batch[:2], max_new_tokens=4, min_new_tokens=4, **kwargs)
        start = time.perf_counter()
        hf.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench parallel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="Hugging Face checkpoint directory")
    ap.add_argument("--mappings", default="1x1,2x1,1x2,2x2", help="tp x pp pairs, comma-separated")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args(argv)

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)]
    result: dict = {
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtype": args.dtype, "cpus": os.cpu_count()},
        "mappings": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmc-bench-parallel-") as tmp:
        for mapping in args.mappings.split(","):
            tp, pp = (int(n) for n in mapping.lower().split("x"))
            engine = Path(tmp) / f"tp{tp}-pp{pp}"
            result["mappings"][f"tp{tp}-pp{pp}"] = {**build(args.model, engine, tp, pp, args.dtype),
                                                    **serve(engine, prompts, args.new_tokens)}
    if not args.no_hf:
        result["hf"] = {"tokens_per_s": hf_tokens_per_s(args.model, args.dtype, prompts, args.new_tokens)}
    base = next(iter(result["mappings"].values()))
    result["ratios"] = {
        name: {
            "throughput_over_first": r["tokens_per_s"] / base["tokens_per_s"],
            "max_rank_weights_over_first": r["max_rank_weights_mb"] / base["max_rank_weights_mb"],
            **({"throughput_over_hf": r["tokens_per_s"] / result["hf"]["tokens_per_s"]} if "hf" in result else {}),
        }
        for name, r in result["mappings"].items()
    }
    result = json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 3))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
