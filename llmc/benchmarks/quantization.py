"""`llmc bench quantization MODEL --text FILE`: what each quantization mode and algorithm (`--quant-algo`)
costs in accuracy and buys in size (and, with --latency, in decode speed), against the unquantized engine
and Hugging Face, in one run; prints JSON.

Every mode is built from MODEL with llmc's default calibration corpus; perplexity is `llmc eval`'s
(windows of --window tokens of FILE). Engine size is the bytes of all its rank files.
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
            result[name] = row
    base = result.get("none")
    if base:
        for name in names:
            result[name]["ppl_vs_none"] = result[name]["ppl"] / base["ppl"]
            result[name]["size_vs_none"] = result[name]["engine_mb"] / base["engine_mb"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
