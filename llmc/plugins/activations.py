"""llmc::gated_activation: act(gate) * up, the gated MLP's middle (SwiGLU when act is silu, GeGLU for gelu).

The reference is torch's activations; on CPU a C++ kernel does both in one pass (csrc/activations.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

torch.library.define("llmc::gated_activation", "(Tensor gate, Tensor up, str act) -> Tensor")


def gated_activation(gate, up, act):
    return ACTIVATIONS[act](gate) * up


def gated_activation_cpu(gate, up, act):
    kernels = cpu_kernels.load()
    if kernels is None or act not in ACTIVATIONS or gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() == 0:
        return gated_activation(gate, up, act)
    return kernels.gated_activation(gate, up, act)


torch.library.impl("llmc::gated_activation", "CompositeExplicitAutograd", gated_activation)
torch.library.impl("llmc::gated_activation", "CPU", gated_activation_cpu)
torch.library.register_fake("llmc::gated_activation", lambda gate, up, act: torch.empty_like(gate))
