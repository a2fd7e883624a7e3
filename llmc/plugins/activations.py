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


cpu_kernels.reference("llmc::gated_activation", gated_activation)
torch.library.register_fake("llmc::gated_activation", lambda gate, up, act: torch.empty_like(gate))
