"""llmc::fp8_linear on CUDA (reference: llmc/plugins/quant_linear.py).

Weight-only (no input_scale): a Triton GEMM that reads the E4M3 weight bytes and decodes them in registers
(code * per-channel scale, rounded to x's dtype as the reference's dequantized weight is), so a decode step reads
one byte per weight. The rows of x are padded to 16 inside the kernel (tl.dot's least), which for a decode
(GEMV-shaped) step costs nothing: the weight bytes are the traffic.

W8A8 (input_scale given): on GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) x is
quantized with its static scale and torch._scaled_mm multiplies the E4M3 operands (row-wise scales: x's per-tensor
scale per row, the weight's per channel; a bf16 result). Elsewhere, and on CPU tensors, x is quantized and read back
and the weight-only kernel runs: the reference's numerics, without the FP8 tensor cores.
The _scaled_mm path has not run yet (no GPU has been available to this project: README's "GPU" section).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.quant_formats import dequantize_fp8, quantize_fp8
from llmc.plugins.triton.common import dot, dot_precision, pow2, rows

BLOCK_N, BLOCK_K = 64, 64


@triton.jit
def _fp8_weight_only_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, m, n, k, stride_x,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        codes = tl.load(w_ptr + cols[None, :].to(tl.int64) * k + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                        other=0.0)
        w = (codes.to(tl.float32) * scale[None, :]).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc += dot(x, w, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fp8_linear(x, weight, weight_scale, input_scale, bias):
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn or weight_scale.shape != (n,) or x.shape[-1] != k:
        raise RuntimeError(f"fp8_linear: weight must be E4M3 [N, K] with weight_scale [N] and x [..., K]; got weight "
                           f"{weight.dtype} {tuple(weight.shape)}, weight_scale {tuple(weight_scale.shape)}, "
                           f"x {tuple(x.shape)}")
    if input_scale is not None:
        if _has_fp8_tensor_cores(x) and k % 16 == 0 and n % 16 == 0:
            return _scaled_mm(x, weight, weight_scale, input_scale, bias)
        x = dequantize_fp8(quantize_fp8(x, input_scale), input_scale, x.dtype)
    return fp8_weight_only(x, weight, weight_scale, bias)


def fp8_weight_only(x, weight, weight_scale, bias):
    n, k = weight.shape
    x2 = rows(x)
    m = x2.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m and n:
        block_m = min(pow2(m, 16), 64)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
        _fp8_weight_only_kernel[grid](x2, weight.contiguous(), weight_scale.contiguous(), bias if bias is not None else x2,
                                      out, m, n, k, x2.stride(0), BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                      HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return out


def _has_fp8_tensor_cores(x) -> bool:
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def _scaled_mm(x, weight, weight_scale, input_scale, bias):
    """W8A8 on FP8 tensor cores. Row-wise scaling (x's per-tensor scale repeated per row, the weight's per channel)
    is what _scaled_mm takes for per-channel weight scales; it returns bf16, cast to x's dtype after the bias."""
    n, k = weight.shape
    x2 = quantize_fp8(x.reshape(-1, k), input_scale)
    m = x2.shape[0]
    out = torch._scaled_mm(x2, weight.t(), scale_a=input_scale.float().reshape(1, 1).expand(m, 1).contiguous(),
                           scale_b=weight_scale.float().reshape(1, n), out_dtype=torch.bfloat16)
    out = out.float() + bias.float() if bias is not None else out
    return out.to(x.dtype).reshape(*x.shape[:-1], n)
