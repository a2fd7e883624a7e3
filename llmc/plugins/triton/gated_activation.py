"""llmc::gated_activation on CUDA: act(gate) * up in one pass (reference: llmc/plugins/activations.py).

The activation runs in fp32 and is rounded to the inputs' dtype before the product, as torch's ops round; gate and
up may be row-strided views (the halves of one fused projection's output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.triton.common import rows as _rows, tanh

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
BLOCK = 1024


@triton.jit
def _gated_activation_kernel(gate_ptr, up_ptr, out_ptr, n, stride_g, stride_u, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(gate_ptr + row * stride_g + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + i, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    a = a.to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n + i, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


def gated_activation(gate, up, act):
    if act not in ACTIVATIONS:
        raise RuntimeError(f"gated_activation: unknown activation {act!r} (known: {', '.join(ACTIVATIONS)})")
    if gate.shape != up.shape:
        raise RuntimeError(f"gated_activation: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    n = gate.shape[-1]
    g2, u2 = (_rows(t) for t in (gate, up))
    out = torch.empty(gate.shape, dtype=torch.result_type(gate, up), device=gate.device)
    if g2.shape[0] and n:
        grid = (g2.shape[0], triton.cdiv(n, BLOCK))
        _gated_activation_kernel[grid](g2, u2, out, n, g2.stride(0), u2.stride(0), ACT=ACTIVATIONS[act], BLOCK=BLOCK)
    return out
