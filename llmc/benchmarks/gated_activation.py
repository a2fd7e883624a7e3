"""`llmc bench gated_activation`: llmc::gated_activation's C++ kernel against its two-op torch reference
(act(gate) * up), on the MLP shape of the 124.7M Llama (ffn 2048, 12 layers; gate and up the halves of
the merged gate/up linear's output, as the graph gives them): a 512-token prefill and a decode step,
fp32 and bf16, each activation; prints JSON. Times are the best of --repeats runs of all layers.
"""

from __future__ import annotations

import argparse
import json
import timeit

import torch

from llmc.plugins import cpu_kernels
from llmc.plugins.activations import ACTIVATIONS, gated_activation


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="llmc bench gated_activation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 1], help="tokens per step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel_op = torch.ops.llmc.gated_activation.default
    if not cpu_kernels.has_kernel(kernel_op):
        raise SystemExit("the C++ kernels are unavailable (LLMC_DISABLE_KERNELS=1): nothing to measure")

    results = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in args.rows:
            # Each layer its own tensors, so a pass reads them from memory as a model step does.
            halves = [torch.randn(1, rows, 2 * args.ffn, generator=gen).to(dtype).split(args.ffn, -1) for _ in range(args.layers)]
            for act in ACTIVATIONS:
                def run(fn):
                    def step():
                        for gate, up in halves:  # each output dropped at once, as the model's next linear does
                            fn(gate, up, act)

                    return 1000 * min(timeit.repeat(step, number=1, repeat=args.repeats))

                reference, kernel = run(gated_activation), run(kernel_op._op)
                results[f"{str(dtype).removeprefix('torch.')}/{rows}x{args.ffn}/{act}"] = {
                    "reference_ms": round(reference, 3), "kernel_ms": round(kernel, 3), "speedup": round(reference / kernel, 2)}
    print(json.dumps({"threads": args.threads, "layers": args.layers, "results": results}, indent=2))


if __name__ == "__main__":
    main()
