"""llmc::rms_norm: HF's RMSNorm as one op: (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, computed in fp32;
llmc::add_rms_norm: the residual add before it too, returning (normalised, x + residual);
llmc::add_layer_norm: the same for LayerNorm with its bias (GPT-2, GPT-J, GPT-NeoX).

The references are those torch ops; on CPU a C++ kernel does each (csrc/rms_norm.cpp, csrc/layer_norm.cpp).
"""

from __future__ import annotations

import torch

from llmc.plugins import cpu_kernels

torch.library.define("llmc::rms_norm", "(Tensor x, Tensor w, float eps) -> Tensor")


def rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


cpu_kernels.reference("llmc::rms_norm", rms_norm)
torch.library.register_fake("llmc::rms_norm", lambda x, w, eps: torch.empty_like(x))


torch.library.define("llmc::add_rms_norm", "(Tensor x, Tensor residual, Tensor w, float eps) -> (Tensor, Tensor)")


def add_rms_norm(x, residual, w, eps):
    h = x + residual
    return rms_norm(h, w, eps), h


cpu_kernels.reference("llmc::add_rms_norm", add_rms_norm)
torch.library.register_fake("llmc::add_rms_norm", lambda x, residual, w, eps: (torch.empty_like(x), torch.empty_like(x)))


torch.library.define(
    "llmc::add_layer_norm", "(Tensor x, Tensor residual, Tensor w, Tensor b, float eps) -> (Tensor, Tensor)"
)


def add_layer_norm(x, residual, w, b, eps):
    h = x + residual
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, eps), h


cpu_kernels.reference("llmc::add_layer_norm", add_layer_norm)
torch.library.register_fake("llmc::add_layer_norm", lambda x, residual, w, b, eps: (torch.empty_like(x), torch.empty_like(x)))
