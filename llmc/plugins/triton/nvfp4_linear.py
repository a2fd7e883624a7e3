"""llmc::nvfp4_linear on CUDA (reference: llmc/plugins/quant_linear.py; the format: llmc/plugins/quant_formats.py).

A Triton GEMM that reads the packed E2M1 bytes and E4M3 block scales and decodes them in registers, so a decode step
reads 9/16 byte per weight. A byte holds elements 2j (low nibble) and 2j + 1 (high): the kernel multiplies x's even
columns by the low nibbles and its odd columns by the high ones, so nothing is interleaved in registers. Both share
block j // 8 of 16. With input_global_scale (W4A4) x is quantized to NVFP4 and read back first, as the reference does;
the product still runs in x's dtype: FP4 tensor cores (Blackwell) are not used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.quant_formats import NVFP4_BLOCK, fake_quantize_nvfp4_activation
from llmc.plugins.triton.common import dot, dot_precision, pow2, rows

BLOCK_N, BLOCK_K = 64, 64  # BLOCK_K elements of K: BLOCK_K / 2 bytes, BLOCK_K / 16 block scales


@triton.jit
def _e2m1(code):
    """E2M1 code (0..15, bit 3 the sign) -> its value: 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    exponent, mantissa = (code >> 1) & 3, (code & 1).to(tl.float32)
    power = tl.where(exponent == 3, 4.0, tl.where(exponent == 2, 2.0, 1.0))
    magnitude = tl.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * power)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _nvfp4_weight_only_kernel(x_ptr, w_ptr, block_scale_ptr, global_scale_ptr, bias_ptr, out_ptr, m, n, k, stride_x,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    global_scale = tl.load(global_scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte index along the row
        j_ok = j < k // 2
        w_mask = col_ok[None, :] & j_ok[:, None]
        packed = tl.load(w_ptr + cols[None, :].to(tl.int64) * (k // 2) + j[:, None], mask=w_mask, other=0).to(tl.int32)
        scale = tl.load(block_scale_ptr + cols[None, :].to(tl.int64) * (k // 16) + j[:, None] // 8, mask=w_mask,
                        other=0.0).to(tl.float32) * global_scale  # [BLOCK_K / 2, BLOCK_N]
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x + 2 * j[None, :]
        x_mask = row_ok[:, None] & j_ok[None, :]
        x_even = tl.load(x_rows, mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + 1, mask=x_mask, other=0.0)
        low = (_e2m1(packed & 15) * scale).to(x_even.dtype)
        high = (_e2m1(packed >> 4) * scale).to(x_even.dtype)
        acc += dot(x_even, low, PRECISION)
        acc += dot(x_odd, high, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias):
    n, k = weight.shape[0], weight.shape[1] * 2
    if weight.dtype != torch.uint8 or weight_scale.shape != (n, k // NVFP4_BLOCK) or x.shape[-1] != k \
            or weight_scale.dtype != torch.float8_e4m3fn:
        raise RuntimeError(f"nvfp4_linear: weight must be packed uint8 [N, K/2] with E4M3 block scales [N, K/16] and x "
                           f"[..., K]; got weight {weight.dtype} {tuple(weight.shape)}, weight_scale {weight_scale.dtype} "
                           f"{tuple(weight_scale.shape)}, x {tuple(x.shape)}")
    if input_global_scale is not None:
        x = fake_quantize_nvfp4_activation(x, input_global_scale)
    x2 = rows(x)
    m = x2.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m and n:
        block_m = min(pow2(m, 16), 64)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
        _nvfp4_weight_only_kernel[grid](
            x2, weight.contiguous(), weight_scale.contiguous(), weight_global_scale.float().reshape(1),
            bias if bias is not None else x2, out, m, n, k, x2.stride(0), BLOCK_M=block_m, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return out
