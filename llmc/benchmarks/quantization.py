"""`llmc bench quantization MODEL --text FILE`: what each quantization mode and algorithm (`--quant-algo`)
costs in accuracy and buys in size (and, with --latency, in decode speed), against the unquantized engine
and Hugging Face, in one run; prints JSON.

Every mode is built from MODEL with llmc's default calibration corpus; perplexity is `llmc eval`'s
(windows of --window tokens of FILE). Engine size is the bytes of all its rank files.

With --latency the run also measures the host's streaming read bandwidth (before and after the engines) and
reports each engine's batch-1 roofline: that bandwidth over the bytes a decode step reads (every weight tensor
once, the embedding table's one row), and the measured batch-1 speed as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
from pathlib import Path

# Every mode with every algorithm that applies to it ("mode" alone is round to nearest, "mode/algo" the others).
ALGOS = {"mse": None, "awq": None, "gptq": None, "smoothquant": "activations"}
MODES = {"fp8": True, "fp8-dynamic": True, "fp8-weight-only": False, "nvfp4": True, "nvfp4-weight-only": False}
CONFIGS = {"none": {}}
for mode, activations in MODES.items():
    CONFIGS[mode] = {"quant": mode}
    if mode == "fp8":
        CONFIGS["fp8 + fp8 kv cache"] = {"quant": "fp8", "kv_cache_dtype": "fp8"}
    CONFIGS.update({f"{mode}/{algo}": {"quant": mode, "quant_algo": algo} for algo, needs in ALGOS.items() if needs is None or activations})


def engine_bytes(engine: Path) -> int:
    return sum(p.stat().st_size for p in engine.glob("rank*/*") if p.is_file())


def decode_bytes_per_token(engine: Path) -> int:
    """Weight bytes one batch-1 decode step reads: every tensor once, but one row of those that only embedding ops
    use (the token's row of the table and of its per-row scales; a table tied to the LM head is read whole)."""
    from safetensors import safe_open

    from llmc.backends.graph_format import graph_from_json

    total = 0
    for rank in engine.glob("rank*"):
        graph = graph_from_json(json.loads((rank / "program.json").read_text()))
        embedding_only = {n.target for n in graph.nodes
                          if n.op == "get_attr" and n.users and all("embedding" in str(user.target) for user in n.users)}
        with safe_open(str(rank / "weights.safetensors"), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                total += tensor[0].nbytes if name in embedding_only and tensor.dim() else tensor.nbytes
    return total


def read_bandwidth_gb_s(mbytes: int = 512, repeats: int = 10) -> float:
    """The host's streaming read bandwidth with torch's threads: the best of `repeats` passes over `mbytes` MB, by
    torch.sum and by llmc's fp32 batch-1 linear (a decode step's access pattern), whichever reads faster."""
    import torch

    from llmc.benchmarks.quant_gemv import best_seconds
    from llmc.plugins.linear import prepack_weight

    n = mbytes * 2**20 // 4 // 1024
    data = prepack_weight(torch.ones(n, 1024))
    x = torch.ones(1, 1024)
    passes = {"sum": data.sum, "linear": lambda: torch.ops.llmc.prepacked_linear(x, data, None, n)}
    return max(data.numel() * 4 / best_seconds(fn, repeats) / 1e9 for fn in passes.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmc bench quantization", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hugging Face checkpoint directory")
    parser.add_argument("--text", required=True, help="held-out UTF-8 text to score")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--exclude", default="lm_head", help="comma-separated weights kept unquantized, as `llmc build --exclude` ('none': none)")
    parser.add_argument("--latency", action="store_true", help="also measure decode and prefill speed (llmc bench latency's method)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import llmc
    from llmc.evaluate import perplexity

    names = args.configs.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    latency = runpy.run_path(str(Path(__file__).with_name("latency.py"))) if args.latency else None
    result = {"model": args.model, "text": args.text, "window": args.window, "dtype": args.dtype, "exclude": args.exclude,
              "hf": perplexity(args.model, args.text, window=args.window, max_tokens=args.max_tokens)}
    exclude = () if args.exclude == "none" else tuple(args.exclude.split(","))
    if latency:
        result["read_gb_s_before"] = read_bandwidth_gb_s()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"[bench] {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            engine = llmc.build(args.model, Path(tmp) / name.replace(" ", "").replace("/", "-"), dtype=args.dtype,
                                calib_samples=args.calib_samples, exclude=exclude, log=lambda _: None, **CONFIGS[name])
            row = {**perplexity(engine, args.text, window=args.window, max_tokens=args.max_tokens), "engine_mb": engine_bytes(engine) / 1e6,
                   "build_s": round(time.perf_counter() - start, 1)}
            if latency:
                prompts = latency["make_prompts"](llmc.engine.EngineConfig.load(engine).vocab_size)
                row.update(latency["bench_llmc"](engine, prompts, args.new_tokens, args.repeats))
                row["decode_mb_per_token"] = decode_bytes_per_token(engine) / 1e6
            result[name] = row
    if latency:  # the roofline from the higher of the two bandwidths (the machine is shared: load only lowers it)
        result["read_gb_s_after"] = read_bandwidth_gb_s()
        result["read_gb_s"] = max(result["read_gb_s_before"], result["read_gb_s_after"])
        for name in names:
            row = result[name]
            row["batch1_roofline_tokens_per_s"] = result["read_gb_s"] * 1e3 / row["decode_mb_per_token"]
            row["batch1_fraction_of_roofline"] = row["batch1_tokens_per_s"] / row["batch1_roofline_tokens_per_s"]
    base = result.get("none")
    if base:
        for name in names:
            result[name]["ppl_vs_none"] = result[name]["ppl"] / base["ppl"]
            result[name]["size_vs_none"] = result[name]["engine_mb"] / base["engine_mb"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
