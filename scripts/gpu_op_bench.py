"""Each Triton kernel against its op's plain-torch reference on the same GPU, at the shapes of a 1B-parameter Llama
(hidden 2048, 32 query and 8 KV heads of 64, MLP 8192) in bf16: python3 scripts/gpu_op_bench.py OUT.json.
Part of scripts/gpu_check.sh. Times are triton.testing.do_bench's medians in microseconds; a case that fails
records its error.
"""

from __future__ import annotations

import json
import sys

import torch
import triton.testing

from llmc.plugins import activations, attention, norms, quant_linear, rotary
from llmc.plugins.quant_formats import quantize_fp8_weight, quantize_nvfp4
from llmc.plugins.triton import fp8_linear, gated_activation, nvfp4_linear, paged_attention, rms_norm
from llmc.plugins.triton import rotary as triton_rotary

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, BLOCK = 2048, 32, 8, 64, 8192, 16
DEVICE = "cuda"
BF16 = dict(device=DEVICE, dtype=torch.bfloat16)


def attention_step(query_lens, context_lens):
    blocks = [-(-c // BLOCK) for c in context_lens]
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32)
    slots, start = [], 0
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        tables[i, :blocks[i]] = torch.arange(start, start + blocks[i])
        slots += [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(c - n, c)]
        start += blocks[i]
    tokens = sum(query_lens)
    return dict(q=torch.randn(1, HEADS, tokens, HEAD_DIM, **BF16), k=torch.randn(1, KV_HEADS, tokens, HEAD_DIM, **BF16),
                v=torch.randn(1, KV_HEADS, tokens, HEAD_DIM, **BF16),
                kv_cache=torch.randn(1, 2, start, BLOCK, KV_HEADS, HEAD_DIM, **BF16), layer=0,
                slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=tables.to(DEVICE),
                seq_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
                query_start_loc=torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32),
                scale=HEAD_DIM ** -0.5, sliding_window=0)


def cases():
    """(name, kernel, reference) triples, made lazily: each case runs before the next one rebinds the inputs."""
    for tokens in (1, 8, 512):
        x, r, w = torch.randn(tokens, HIDDEN, **BF16), torch.randn(tokens, HIDDEN, **BF16), torch.randn(HIDDEN, **BF16)
        yield f"add_rms_norm T={tokens}", lambda: rms_norm.add_rms_norm(x, r, w, 1e-5), lambda: norms.add_rms_norm(x, r, w, 1e-5)
        g, u = torch.randn(tokens, MLP, **BF16), torch.randn(tokens, MLP, **BF16)
        yield f"gated_activation silu T={tokens}", lambda: gated_activation.gated_activation(g, u, "silu"), \
            lambda: activations.gated_activation(g, u, "silu")
        q, cos, sin = (torch.randn(1, HEADS, tokens, HEAD_DIM, **BF16), torch.randn(1, 1, tokens, HEAD_DIM, **BF16),
                       torch.randn(1, 1, tokens, HEAD_DIM, **BF16))
        yield f"rotary_embedding T={tokens}", lambda: triton_rotary.rotary_embedding(q, cos, sin), \
            lambda: rotary.rotary_embedding(q, cos, sin)
        weight = torch.randn(MLP, HIDDEN, device=DEVICE)
        q8, s8 = quantize_fp8_weight(weight)
        q4, bs4, gs4 = quantize_nvfp4(weight)
        bf16_weight = weight.to(torch.bfloat16)
        yield f"bf16 F.linear (cuBLAS, the baseline) {tokens}x{HIDDEN}x{MLP}", lambda: torch.nn.functional.linear(x, bf16_weight), None
        yield f"fp8_linear weight-only {tokens}x{HIDDEN}x{MLP}", lambda: fp8_linear.fp8_linear(x, q8, s8, None, None), \
            lambda: quant_linear.fp8_linear(x, q8, s8, None, None)
        input_scale = x.float().abs().amax() / 448
        yield f"fp8_linear W8A8 (_scaled_mm) {tokens}x{HIDDEN}x{MLP}", lambda: fp8_linear.fp8_linear(x, q8, s8, input_scale, None), \
            lambda: quant_linear.fp8_linear(x, q8, s8, input_scale, None)
        yield f"nvfp4_linear weight-only {tokens}x{HIDDEN}x{MLP}", lambda: nvfp4_linear.nvfp4_linear(x, q4, bs4, gs4, None, None), \
            lambda: quant_linear.nvfp4_linear(x, q4, bs4, gs4, None, None)
    for name, step in (("decode batch 8, context 512", attention_step([1] * 8, [512] * 8)),
                       ("prefill 512", attention_step([512], [512])),
                       ("prefill chunk 256 of 1024 + 7 decodes", attention_step([256] + [1] * 7, [1024] + [300] * 7))):
        yield f"paged_attention {name}", lambda s=step: paged_attention.paged_attention(**s), \
            lambda s=step: attention.paged_attention(**s)


def main(out_path):
    results = []
    for name, kernel, reference in cases():
        try:
            row = {"case": name, "triton_us": round(triton.testing.do_bench(kernel) * 1000, 1)}
            if reference is not None:
                row["reference_us"] = round(triton.testing.do_bench(reference) * 1000, 1)
        except Exception as e:  # recorded, and the next case still runs
            row = {"case": name, "error": f"{type(e).__name__}: {e}"[:500]}
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
