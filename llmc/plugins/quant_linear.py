"""llmc::fp8_linear and llmc::nvfp4_linear: linear layers whose weights stay packed (quant_formats).

    fp8_linear(x, weight [N, K] e4m3, weight_scale [N] fp32, input_scale, bias)
    nvfp4_linear(x, weight [N, K/2] uint8, weight_scale [N, K/16] e4m3, weight_global_scale, input_global_scale, bias)

With input_scale / input_global_scale None the layer is weight-only: x is used as it is. Given,
x is quantized first (W8A8: E4M3 with that static per-tensor scale; W4A4: NVFP4 blocks with
dynamic block scales and that global scale) and read back, so the output is what a quantized
matmul gives up to fp32 rounding. The reference dequantizes and calls F.linear in x's dtype.

On CPU, steps of a few rows (decode) run C++ kernels that decode the packed weights inside the
dot products (csrc/quant_linear.cpp), so a step reads 1 or 9/16 byte per weight. Larger steps
dequantize the weights a tile of output rows at a time and call torch's GEMM on each tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4, fake_quantize_nvfp4_activation, quantize_fp8

# Most rows the decode kernels take (their limit). On the dev machine (2 threads, a 4096 x 768
# weight) they beat dequantized tiles + GEMM at every row count up to it: 1.8x at 16 rows.
KERNEL_MAX_ROWS = 16
# Weights dequantized per GEMM call in the prefill path: 2M fp32 values (8 MB) stay in cache.
TILE_ELEMENTS = 1 << 21

torch.library.define(
    "llmc::fp8_linear", "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias) -> Tensor"
)
torch.library.define(
    "llmc::nvfp4_linear",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, Tensor? input_global_scale, "
    "Tensor? bias) -> Tensor",
)


def _fp8_input(x, input_scale):
    return x if input_scale is None else dequantize_fp8(quantize_fp8(x, input_scale), input_scale, x.dtype)


def _nvfp4_input(x, input_global_scale):
    return x if input_global_scale is None else fake_quantize_nvfp4_activation(x, input_global_scale)


def fp8_linear(x, weight, weight_scale, input_scale, bias):
    w = dequantize_fp8(weight, weight_scale[:, None], x.dtype)
    return F.linear(_fp8_input(x, input_scale), w, bias)


def nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias):
    w = dequantize_nvfp4(weight, weight_scale, weight_global_scale, x.dtype)
    return F.linear(_nvfp4_input(x, input_global_scale), w, bias)


def _tiled(x, n, k, dequantize_rows, bias):
    """F.linear(x, W, bias) with W's rows dequantized tile by tile (dequantize_rows(n0, n1) -> fp32)."""
    out = x.new_empty((*x.shape[:-1], n))
    tile = max(1, TILE_ELEMENTS // k)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        out[..., n0:n1] = F.linear(x, dequantize_rows(n0, n1).to(x.dtype), None if bias is None else bias[n0:n1])
    return out


def _use_kernel(kernels, x, weight):
    return kernels is not None and x.numel() // x.shape[-1] <= KERNEL_MAX_ROWS and weight.is_contiguous()


def fp8_linear_cpu(x, weight, weight_scale, input_scale, bias):
    kernels = cpu_kernels.load()
    if kernels is None:
        return fp8_linear(x, weight, weight_scale, input_scale, bias)
    if _use_kernel(kernels, x, weight):
        return kernels.fp8_linear(x, weight, weight_scale, input_scale, bias)
    x = _fp8_input(x, input_scale)
    weight = weight.contiguous()
    return _tiled(x, *weight.shape, lambda a, b: kernels.fp8_dequantize(weight[a:b], weight_scale[a:b]), bias)


def nvfp4_linear_cpu(x, weight, weight_scale, weight_global_scale, input_global_scale, bias):
    kernels = cpu_kernels.load()
    if kernels is None:
        return nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias)
    if _use_kernel(kernels, x, weight) and weight_scale.is_contiguous():
        return kernels.nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias)
    x = _nvfp4_input(x, input_global_scale)
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    return _tiled(x, weight.shape[0], 2 * weight.shape[1],
                  lambda a, b: kernels.nvfp4_dequantize(weight[a:b], weight_scale[a:b], weight_global_scale), bias)


def fp8_linear_fake(x, weight, weight_scale, input_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def nvfp4_linear_fake(x, weight, weight_scale, weight_global_scale, input_global_scale, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


torch.library.impl("llmc::fp8_linear", "CompositeExplicitAutograd", fp8_linear)
torch.library.impl("llmc::fp8_linear", "CPU", fp8_linear_cpu)
torch.library.register_fake("llmc::fp8_linear", fp8_linear_fake)
torch.library.impl("llmc::nvfp4_linear", "CompositeExplicitAutograd", nvfp4_linear)
torch.library.impl("llmc::nvfp4_linear", "CPU", nvfp4_linear_cpu)
torch.library.register_fake("llmc::nvfp4_linear", nvfp4_linear_fake)
