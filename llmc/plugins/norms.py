"""llmc::rms_norm: HF's RMSNorm as one op: (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * w, computed in fp32.

The reference is those torch ops; on CPU a C++ kernel does a row in one pass (csrc/rms_norm.cpp).
"""

from __future__ import annotations

import torch

from llmc.plugins import cpu_kernels

torch.library.define("llmc::rms_norm", "(Tensor x, Tensor w, float eps) -> Tensor")


def rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_cpu(x, w, eps):
    kernels = cpu_kernels.load()
    if kernels is None or x.dtype != w.dtype:
        return rms_norm(x, w, eps)
    return kernels.rms_norm(x, w, eps)


torch.library.impl("llmc::rms_norm", "CompositeExplicitAutograd", rms_norm)
torch.library.impl("llmc::rms_norm", "CPU", rms_norm_cpu)
torch.library.register_fake("llmc::rms_norm", lambda x, w, eps: torch.empty_like(x))
