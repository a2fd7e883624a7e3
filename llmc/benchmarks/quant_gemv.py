"""`llmc bench quant_gemv`: decode-step (batch 1) matrix-vector speed of llmc's linear ops by weight
format, on the linear shapes of the 124.7M Llama (hidden 768, 12 layers, q 768 + k 256 + v 256
merged, gate_up merged, ffn 2048, vocab 32000); prints JSON.

Formats: fp32 (llmc::prepacked_linear), fp8 and nvfp4 weight-only, W8A8 and W4A4 (with an input scale),
each prepacked as the torch backend loads it (llmc::fp8_prepacked_linear / llmc::nvfp4_prepacked_linear). Each layer has its own random weights, so a pass over the
stack streams them from memory as a real decode step does (they do not fit in the caches).
Times are the best of --repeats runs. Reported per format: time of one pass over the layers' linears (through the op, and calling the
kernel at its C++ entry point as the generated step does, which leaves out OpOverload's Python call), per shape the time per call and the GB/s of
weight bytes read (packed values and scales), and the LM head in fp32, fp8 and nvfp4. The
`tokens_per_s_linears` lines are 1 / (layers + LM head): an upper bound for the whole model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import llmc.plugins  # noqa: F401  (the ops)
from llmc.plugins import cpu_kernels
from llmc.plugins.linear import prepack_weight
from llmc.plugins.quant_formats import nvfp4_global_scale, quantize_fp8_weight, quantize_nvfp4
from llmc.plugins.quant_linear import prepack_quantized

FORMATS = ("fp32", "fp8", "nvfp4", "w8a8", "w4a4")


def shapes(hidden: int, ffn: int, q_heads: int, kv_heads: int) -> dict:
    head_dim = hidden // q_heads
    return {"qkv": (hidden + 2 * kv_heads * head_dim, hidden), "o": (hidden, hidden),
            "gate_up": (2 * ffn, hidden), "down": (hidden, ffn)}


def make(fmt: str, n: int, k: int, gen: torch.Generator):
    """(op, kernel, args after x, bytes read per call) for one random [n, k] weight."""
    w = torch.randn(n, k, generator=gen) * 0.02
    ops = torch.ops.llmc  # the kernels: what the ops run on CPU, called at their C++ entry point as the step calls them
    if fmt == "fp32":  # as the torch backend runs it: prepacked at load
        return ops.prepacked_linear, ops.prepacked_linear.default._op, (prepack_weight(w), None, n), w.numel() * 4
    if fmt in ("fp8", "w8a8"):
        q, scale = quantize_fp8_weight(w)
        input_scale = torch.tensor(4.0 / 448) if fmt == "w8a8" else None
        args = (prepack_quantized(q), scale, input_scale, None, n)
        return ops.fp8_prepacked_linear, ops.fp8_prepacked_linear.default._op, args, q.numel() + 4 * n
    packed, block_scale, global_scale = quantize_nvfp4(w)
    input_global_scale = nvfp4_global_scale(torch.tensor(4.0)) if fmt == "w4a4" else None
    args = (prepack_quantized(packed), prepack_quantized(block_scale), global_scale, input_global_scale, None, n)
    return ops.nvfp4_prepacked_linear, ops.nvfp4_prepacked_linear.default._op, args, packed.numel() + block_scale.numel()


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` runs after a warm-up: on a shared machine the others measure the
    neighbours (a 2-thread kernel waits for a preempted thread), not the kernel."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_format(fmt, layer_shapes, layers, head_shape, x, repeats, gen) -> dict:
    stack = {name: [make(fmt, n, k, gen) for _ in range(layers)] for name, (n, k) in layer_shapes.items()}
    inputs = {name: x[name] for name in layer_shapes}

    def run(names, direct):
        for i in range(layers):
            for name in names:
                op, kernel, args, _ = stack[name][i]
                (kernel if direct else op)(inputs[name], *args)

    result = {
        "stack_ms": 1000 * best_seconds(lambda: run(layer_shapes, False), repeats),
        "stack_kernels_only_ms": 1000 * best_seconds(lambda: run(layer_shapes, True), repeats),
        "stack_mb": sum(s[3] for entries in stack.values() for s in entries) / 1e6,
        "per_call": {},
    }
    for name in layer_shapes:
        seconds = best_seconds(lambda: run([name], True), repeats) / layers
        nbytes = stack[name][0][3]
        result["per_call"][name] = {"us": 1e6 * seconds, "gb_per_s": nbytes / seconds / 1e9}
    if fmt in ("fp32", "fp8", "nvfp4"):  # the LM head (weight-only), run after the stack evicts it
        op, _, args, nbytes = make(fmt, *head_shape, gen)
        xh = x["head"]

        def head():
            run(layer_shapes, True)
            start = time.perf_counter()
            op(xh, *args)
            return time.perf_counter() - start

        head()
        seconds = min(head() for _ in range(repeats))
        result["lm_head"] = {"ms": 1000 * seconds, "gb_per_s": nbytes / seconds / 1e9}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="llmc bench quant_gemv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rows", type=int, default=1, help="inputs per step (1: batch-1 decode)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.has_kernel(torch.ops.llmc.fp8_prepacked_linear.default):
        raise SystemExit(f"no quantized-linear kernels here (LLMC_DISABLE_KERNELS=1, or a CPU without AVX-512: "
                         f"{cpu_kernels.load()}): nothing to measure")
    formats = args.formats.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown formats {sorted(unknown)}; choose from {','.join(FORMATS)}")

    gen = torch.Generator().manual_seed(0)
    layer_shapes = shapes(args.hidden, args.ffn, args.heads, args.kv_heads)
    x = {name: torch.randn(args.rows, k, generator=gen) for name, (_, k) in layer_shapes.items()}
    x["head"] = torch.randn(args.rows, args.hidden, generator=gen)
    head_shape = (args.vocab, args.hidden)
    results = {fmt: bench_format(fmt, layer_shapes, args.layers, head_shape, x, args.repeats, gen) for fmt in formats}

    # Whole-model bound from the linears alone: the layer stack (through the ops) plus an LM head.
    bounds = {}
    for fmt, r in results.items():
        weight_fmt = {"w8a8": "fp8", "w4a4": "nvfp4"}.get(fmt, fmt)
        for head_fmt in dict.fromkeys(("fp32", weight_fmt)):
            if head_fmt in results and "lm_head" in results[head_fmt]:
                ms = r["stack_ms"] + results[head_fmt]["lm_head"]["ms"]
                bounds[f"{fmt}+{head_fmt}_head"] = 1000 / ms
    print(json.dumps({
        "workload": {"shapes": layer_shapes, "layers": args.layers, "lm_head": head_shape, "rows": args.rows,
                     "threads": torch.get_num_threads(), "repeats": args.repeats},
        "formats": results,
        "tokens_per_s_linears": bounds,
    }, indent=1))


if __name__ == "__main__":
    main()
