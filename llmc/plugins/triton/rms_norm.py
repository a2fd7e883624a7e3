"""llmc::rms_norm and llmc::add_rms_norm on CUDA: one pass per row (reference: llmc/plugins/norms.py).

A program normalises one row of the hidden size in fp32, with the reference's roundings: the residual sum in the
inputs' dtype (it is also returned), the normalised row in x's dtype before the weight multiplies it, the output in
the dtype torch gives w * normalised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.triton.common import pow2, rows as _rows


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, w_ptr, out_ptr, sum_ptr, eps, n, stride_x, stride_r,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < n
    h = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        h += tl.load(residual_ptr + row * stride_r + i, mask=ok, other=0.0).to(tl.float32)
        h = h.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n + i, h, mask=ok)
        h = h.to(tl.float32)
    normed = h * (1.0 / tl.sqrt(tl.sum(h * h, 0) / n + eps))
    normed = normed.to(sum_ptr.dtype.element_ty).to(tl.float32)  # h's dtype (x itself without ADD)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + i, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x, w, eps):
    return _launch(x, None, w, eps)[0]


def add_rms_norm(x, residual, w, eps):
    return _launch(x, residual, w, eps)


def _launch(x, residual, w, eps):
    n = x.shape[-1]
    if w.shape != (n,) or (residual is not None and residual.shape != x.shape):
        raise RuntimeError(f"rms_norm: w must be [{n}] and residual like x {tuple(x.shape)}, got w {tuple(w.shape)}"
                           + ("" if residual is None else f" and residual {tuple(residual.shape)}"))
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    h_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    h = None if residual is None else torch.empty(x.shape, dtype=h_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=torch.result_type(w, torch.empty((), dtype=h_dtype)), device=x.device)
    block = pow2(n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, w.contiguous(), out, x2 if h is None else h, float(eps), n,
                                         x2.stride(0), r2.stride(0), BLOCK=block, ADD=residual is not None,
                                         num_warps=min(max(block // 256, 1), 16))
    return out, h
