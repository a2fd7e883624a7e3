"""llmc::add_layer_norm on CUDA: the residual add and LayerNorm with its bias in one pass per row (reference:
llmc/plugins/norms.py). The sum is rounded to the inputs' dtype (it is also returned); mean, variance and the affine
transform run in fp32 and the output is rounded once, as torch's layer_norm does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.triton.common import pow2, rows


@triton.jit
def _add_layer_norm_kernel(x_ptr, residual_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, eps, n, stride_x, stride_r,
                           BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < n
    h = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32) \
        + tl.load(residual_ptr + row * stride_r + i, mask=ok, other=0.0).to(tl.float32)
    h = h.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * n + i, h, mask=ok)
    h = h.to(tl.float32)
    mean = tl.sum(h, 0) / n
    centred = tl.where(ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n + eps)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + i, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=ok)


def add_layer_norm(x, residual, w, b, eps):
    n = x.shape[-1]
    if w.shape != (n,) or b.shape != (n,) or residual.shape != x.shape:
        raise RuntimeError(f"add_layer_norm: w and b must be [{n}] and residual like x {tuple(x.shape)}, got w "
                           f"{tuple(w.shape)}, b {tuple(b.shape)}, residual {tuple(residual.shape)}")
    x2, r2 = rows(x), rows(residual)
    h = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    out = torch.empty_like(h)
    block = pow2(n)
    if x2.shape[0]:
        _add_layer_norm_kernel[(x2.shape[0],)](x2, r2, w.contiguous(), b.contiguous(), out, h, float(eps), n,
                                               x2.stride(0), r2.stride(0), BLOCK=block,
                                               num_warps=min(max(block // 256, 1), 16))
    return out, h
