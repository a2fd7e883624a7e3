"""llmc::fp8_embedding and llmc::nvfp4_embedding: token embeddings read from packed tables.

A table is quantized like a linear's weight ([vocab, hidden] as [N, K]): FP8 with one scale per row,
NVFP4 in blocks of 16 along a row. So each row decodes on its own, a lookup dequantizes only the
rows it gathers, and a tied LM head and embedding share one packed table.
"""

from __future__ import annotations

import torch

from llmc.plugins import cpu_kernels
from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4

torch.library.define("llmc::fp8_embedding", "(Tensor weight, Tensor weight_scale, Tensor ids, ScalarType dtype) -> Tensor")
torch.library.define(
    "llmc::nvfp4_embedding", "(Tensor weight, Tensor weight_scale, Tensor weight_global_scale, Tensor ids, ScalarType dtype) -> Tensor"
)


def fp8_embedding(weight, weight_scale, ids, dtype):
    flat = ids.flatten()
    rows = dequantize_fp8(weight[flat], weight_scale[flat, None], dtype)
    return rows.view(*ids.shape, weight.shape[1])


def nvfp4_embedding(weight, weight_scale, weight_global_scale, ids, dtype):
    flat = ids.flatten()
    rows = dequantize_nvfp4(weight[flat], weight_scale[flat], weight_global_scale, dtype)
    return rows.view(*ids.shape, 2 * weight.shape[1])


cpu_kernels.reference("llmc::fp8_embedding", fp8_embedding)
cpu_kernels.reference("llmc::nvfp4_embedding", nvfp4_embedding)
torch.library.register_fake(
    "llmc::fp8_embedding", lambda weight, weight_scale, ids, dtype: weight.new_empty((*ids.shape, weight.shape[1]), dtype=dtype)
)
torch.library.register_fake(
    "llmc::nvfp4_embedding",
    lambda weight, weight_scale, global_scale, ids, dtype: weight.new_empty((*ids.shape, 2 * weight.shape[1]), dtype=dtype),
)
