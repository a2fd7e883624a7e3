"""llmc::moe: a mixture-of-experts layer's experts, given the router's choice.

    out[t] = sum over k of topk_weights[t, k] * expert_e(x[t]),  e = topk_ids[t, k] - first_expert,
    expert_e(x) = down[e] glu(gate, up) + down_bias[e],  [gate; up] = gate_up[e] x + gate_up_bias[e]

Only the chosen experts run. `gate_up` [E, 2I, H] holds each expert's gate rows then its up rows
(transformers' fused layout), `down` is [E, H, I]; the biases [E, 2I] and [E, H] are optional. `act` names
glu: act(gate) * up for silu, gelu and gelu_tanh; "clamped_swiglu" is GPT-OSS's
(up' + 1) * gate' * sigmoid(swiglu_alpha * gate'), gate' = min(gate, limit), up' = up clamped to +-limit. A rank of expert parallelism holds E of the model's
experts, those from `first_expert` on; ids outside them contribute nothing, so each rank computes its
experts' part and an all-reduce sums the parts (docs/design.md, Parallelism). Products are summed in
fp32 and rounded to x's dtype once.

The reference is the definition; on CPU a C++ kernel (csrc/moe.cpp) computes the same with the same
ATen matrix products, without Python's loop. llmc::prepacked_moe is what it runs as where llmc's CPU kernels
are loaded: the torch backend prepacks each expert's weights at load into csrc/linear.cpp's column blocks
(`prepack_experts`, as `prepack_linears` does a linear's), and its kernel runs the chosen experts with the dense
linears' blocked kernel; its reference is llmc::moe's over the unpacked weights.

llmc::fp8_moe and llmc::nvfp4_moe are the same layer over packed expert weights (weight-only: x is used as
it is), each expert quantized on its own as a linear's weight is (plugins/quant_formats.py): FP8 with a scale
per output feature, NVFP4 with E4M3 block scales and a global scale per expert. Their references dequantize
only the chosen experts' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.activations import ACTIVATIONS
from llmc.plugins.linear import prepack_weight, register_prepacked, unpack_weight
from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4

# Biases and the clamped SwiGLU's constants, last in each op's schema (GPT-OSS's experts).
_OPTIONAL_ARGS = ", Tensor? gate_up_bias=None, Tensor? down_bias=None, float swiglu_alpha=0., float swiglu_limit=0."
OPTIONAL_ARG_NAMES = ("gate_up_bias", "down_bias", "swiglu_alpha", "swiglu_limit")

torch.library.define(
    "llmc::moe",
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor down, str act, int first_expert"
    f"{_OPTIONAL_ARGS}) -> Tensor",
)


torch.library.define(
    "llmc::fp8_moe",
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor gate_up_scale, Tensor down, "
    f"Tensor down_scale, str act, int first_expert{_OPTIONAL_ARGS}) -> Tensor",
)
torch.library.define(
    "llmc::nvfp4_moe",
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor gate_up_scale, Tensor gate_up_global_scale, "
    f"Tensor down, Tensor down_scale, Tensor down_global_scale, str act, int first_expert{_OPTIONAL_ARGS}) -> Tensor",
)


# gate_up and down prepacked (prepack_experts); out_features is gate_up's rows (2 x intermediate). Every argument is
# given: the torch backend writes its calls (plugins/linear.py, prepack_linears).
torch.library.define(
    "llmc::prepacked_moe",
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor down, str act, int first_expert, "
    "Tensor? gate_up_bias, Tensor? down_bias, float swiglu_alpha, float swiglu_limit, int out_features) -> Tensor",
)


def clamped_swiglu(gate, up, alpha: float, limit: float):
    """GPT-OSS's gated activation, in transformers' order of ops."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def glu(gate, up, act: str, alpha: float, limit: float):
    return clamped_swiglu(gate, up, alpha, limit) if act == "clamped_swiglu" else ACTIVATIONS[act](gate) * up


def run_experts(x, topk_ids, topk_weights, num_experts: int, expert, act, first_expert, gate_up_bias, down_bias,
                swiglu_alpha, swiglu_limit):
    """The layer, with `expert(e)` giving expert e's (gate_up [2I, H], down [H, I]) in x's dtype."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = topk_ids - first_expert
    for e in local.unique().tolist():  # ascending, as transformers' loop over experts
        if not 0 <= e < num_experts:
            continue  # another rank's expert
        token, slot = torch.where(local == e)
        gate_up, down = expert(e)
        gate, up = F.linear(x[token], gate_up, None if gate_up_bias is None else gate_up_bias[e]).chunk(2, dim=-1)
        y = F.linear(glu(gate, up, act, swiglu_alpha, swiglu_limit), down, None if down_bias is None else down_bias[e])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def moe(x, topk_ids, topk_weights, gate_up, down, act, first_expert, gate_up_bias=None, down_bias=None,
        swiglu_alpha=0.0, swiglu_limit=0.0):
    return run_experts(x, topk_ids, topk_weights, gate_up.shape[0], lambda e: (gate_up[e], down[e]), act, first_expert,
                       gate_up_bias, down_bias, swiglu_alpha, swiglu_limit)


def fp8_moe(x, topk_ids, topk_weights, gate_up, gate_up_scale, down, down_scale, act, first_expert, gate_up_bias=None,
            down_bias=None, swiglu_alpha=0.0, swiglu_limit=0.0):
    def expert(e):
        return (dequantize_fp8(gate_up[e], gate_up_scale[e, :, None], x.dtype),
                dequantize_fp8(down[e], down_scale[e, :, None], x.dtype))

    return run_experts(x, topk_ids, topk_weights, gate_up.shape[0], expert, act, first_expert, gate_up_bias, down_bias,
                       swiglu_alpha, swiglu_limit)


def nvfp4_moe(x, topk_ids, topk_weights, gate_up, gate_up_scale, gate_up_global_scale, down, down_scale,
              down_global_scale, act, first_expert, gate_up_bias=None, down_bias=None, swiglu_alpha=0.0,
              swiglu_limit=0.0):
    def expert(e):
        return (dequantize_nvfp4(gate_up[e], gate_up_scale[e], gate_up_global_scale[e], x.dtype),
                dequantize_nvfp4(down[e], down_scale[e], down_global_scale[e], x.dtype))

    return run_experts(x, topk_ids, topk_weights, gate_up.shape[0], expert, act, first_expert, gate_up_bias, down_bias,
                       swiglu_alpha, swiglu_limit)


def prepacked_moe(x, topk_ids, topk_weights, gate_up, down, act, first_expert, gate_up_bias, down_bias, swiglu_alpha,
                  swiglu_limit, out_features):
    hidden, intermediate = x.shape[-1], out_features // 2

    def expert(e):
        return (unpack_weight(gate_up[e], out_features, hidden).contiguous(),  # llmc::moe's GEMM on the same layout
                unpack_weight(down[e], hidden, intermediate).contiguous())

    return run_experts(x, topk_ids, topk_weights, gate_up.shape[0], expert, act, first_expert, gate_up_bias, down_bias,
                       swiglu_alpha, swiglu_limit)


def prepack_experts(w: torch.Tensor) -> torch.Tensor | None:
    """[E, N, K] -> each expert's weight prepacked as a linear's (plugins/linear.py, prepack_weight), stacked; None
    for dtypes the kernel does not take."""
    if w.dtype not in (torch.float32, torch.bfloat16):
        return None
    return torch.stack([prepack_weight(expert) for expert in w])


for name, fn in (("moe", moe), ("fp8_moe", fp8_moe), ("nvfp4_moe", nvfp4_moe), ("prepacked_moe", prepacked_moe)):
    cpu_kernels.reference(f"llmc::{name}", fn)
    torch.library.register_fake(f"llmc::{name}", lambda x, *args, **kwargs: torch.empty_like(x))

register_prepacked(torch.ops.llmc.moe.default, torch.ops.llmc.prepacked_moe.default, {3: prepack_experts, 4: prepack_experts})
