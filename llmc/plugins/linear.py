"""llmc::linear: y = x W^T + b, the op every linear layer becomes.

The reference is torch's own linear. On CPU, steps of a few rows (decode) run a C++ kernel that
reads each weight once per step however many rows there are (csrc/linear.cpp); larger ones
(prefill) are GEMMs, which torch's kernels already do well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels

# Most rows the kernel takes, by weight dtype. Measured on the dev machine (2 threads, 124.7M Llama's
# linears): fp32 1.9x torch at 1 row, 1.7x at 8; bf16 1.9x at 1 row but no faster at 8.
KERNEL_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4}

torch.library.define("llmc::linear", "(Tensor x, Tensor w, Tensor? bias) -> Tensor")


def linear(x, w, bias):
    return F.linear(x, w, bias)


def linear_cpu(x, w, bias):
    kernels = cpu_kernels.load()
    rows = x.numel() // x.shape[-1]
    if kernels is None or rows > KERNEL_MAX_ROWS.get(w.dtype, 0) or not w.is_contiguous():
        return F.linear(x, w, bias)
    return kernels.linear(x, w, bias)


def linear_fake(x, w, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


torch.library.impl("llmc::linear", "CompositeExplicitAutograd", linear)
torch.library.impl("llmc::linear", "CPU", linear_cpu)
torch.library.register_fake("llmc::linear", linear_fake)
