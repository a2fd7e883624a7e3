"""llmc::fp8_linear, llmc::fp8_dynamic_linear and llmc::nvfp4_linear: linear layers whose weights stay packed (quant_formats).

    fp8_linear(x, weight [N, K] e4m3, weight_scale [N] fp32, input_scale, bias)
    fp8_dynamic_linear(x, weight [N, K] e4m3, weight_scale [N] fp32, bias)
    nvfp4_linear(x, weight [N, K/2] uint8, weight_scale [N, K/16] e4m3, weight_global_scale, input_global_scale, bias)

With input_scale / input_global_scale None the layer is weight-only: x is used as it is. Given,
x is quantized first (W8A8: E4M3 with that static per-tensor scale; W4A4: NVFP4 blocks with
dynamic block scales and that global scale) and read back, so the output is what a quantized
matmul gives up to fp32 rounding. fp8_dynamic_linear always quantizes x, each token (row) with its own
scale, its amax / 448 (vLLM's default FP8). The reference dequantizes and calls F.linear in x's dtype.

On CPU the torch backend runs them as llmc::fp8_prepacked_linear and llmc::nvfp4_prepacked_linear
(`prepack_linears` in plugins/linear.py): the packed bytes, and NVFP4's block scales, reordered once at
load time into groups of 64 output features (`prepack_quantized`), which csrc/quant_linear.cpp streams
and decodes inside the dot products, so a decode step reads 1 or 9/16 byte per weight. For prefill it
decodes each group once into fp32 for all rows and runs the blocked GEMM of csrc/linear.cpp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.linear import column_blocks, from_column_blocks, register_prepacked
from llmc.plugins.quant_formats import (
    E4M3_MAX, _positive, dequantize_fp8, dequantize_nvfp4, fake_quantize_nvfp4_activation, quantize_fp8,
)

GROUP = 64  # output features per group of the prepacked layout: one cache line of E4M3 bytes per input feature

torch.library.define(
    "llmc::fp8_linear", "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias) -> Tensor"
)
torch.library.define(
    "llmc::nvfp4_linear",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, Tensor? input_global_scale, "
    "Tensor? bias) -> Tensor",
)
torch.library.define("llmc::fp8_dynamic_linear", "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor")
torch.library.define(
    "llmc::fp8_dynamic_prepacked_linear", "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, int out_features) -> Tensor"
)
torch.library.define(
    "llmc::fp8_prepacked_linear",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? input_scale, Tensor? bias, int out_features) -> Tensor",
)
torch.library.define(
    "llmc::nvfp4_prepacked_linear",
    "(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_global_scale, Tensor? input_global_scale, "
    "Tensor? bias, int out_features) -> Tensor",
)


def fp8_linear(x, weight, weight_scale, input_scale, bias):
    if input_scale is not None:
        x = dequantize_fp8(quantize_fp8(x, input_scale), input_scale, x.dtype)
    return F.linear(x, dequantize_fp8(weight, weight_scale[:, None], x.dtype), bias)


def fp8_dynamic_linear(x, weight, weight_scale, bias):
    scale = _positive(x.float().abs().amax(dim=-1, keepdim=True) / E4M3_MAX)
    x = dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)
    return F.linear(x, dequantize_fp8(weight, weight_scale[:, None], x.dtype), bias)


def nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias):
    if input_global_scale is not None:
        x = fake_quantize_nvfp4_activation(x, input_global_scale)
    return F.linear(x, dequantize_nvfp4(weight, weight_scale, weight_global_scale, x.dtype), bias)


def prepack_quantized(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes (or block scales) [N, ...] -> [N/64, ..., 64], the extra outputs zero."""
    return column_blocks(packed, GROUP)


def fp8_prepacked_linear(x, weight, weight_scale, input_scale, bias, out_features):
    return fp8_linear(x, from_column_blocks(weight, out_features), weight_scale, input_scale, bias)


def fp8_dynamic_prepacked_linear(x, weight, weight_scale, bias, out_features):
    return fp8_dynamic_linear(x, from_column_blocks(weight, out_features), weight_scale, bias)


def nvfp4_prepacked_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias, out_features):
    weight, weight_scale = from_column_blocks(weight, out_features), from_column_blocks(weight_scale, out_features)
    return nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias)


def linear_fake(x, weight, *args):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def prepacked_linear_fake(x, *args):
    return x.new_empty((*x.shape[:-1], args[-1]))


for name, reference, fake in [
    ("fp8_linear", fp8_linear, linear_fake),
    ("nvfp4_linear", nvfp4_linear, linear_fake),
    ("fp8_dynamic_linear", fp8_dynamic_linear, linear_fake),
    ("fp8_dynamic_prepacked_linear", fp8_dynamic_prepacked_linear, prepacked_linear_fake),
    ("fp8_prepacked_linear", fp8_prepacked_linear, prepacked_linear_fake),
    ("nvfp4_prepacked_linear", nvfp4_prepacked_linear, prepacked_linear_fake),
]:
    cpu_kernels.reference(f"llmc::{name}", reference)
    torch.library.register_fake(f"llmc::{name}", fake)

register_prepacked(torch.ops.llmc.fp8_linear.default, torch.ops.llmc.fp8_prepacked_linear.default, {1: prepack_quantized})
register_prepacked(
    torch.ops.llmc.fp8_dynamic_linear.default, torch.ops.llmc.fp8_dynamic_prepacked_linear.default, {1: prepack_quantized}
)
register_prepacked(
    torch.ops.llmc.nvfp4_linear.default,
    torch.ops.llmc.nvfp4_prepacked_linear.default,
    {1: prepack_quantized, 2: prepack_quantized},
)
