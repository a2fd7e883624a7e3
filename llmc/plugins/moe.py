"""llmc::moe: a mixture-of-experts layer's experts, given the router's choice.

    out[t] = sum over k of topk_weights[t, k] * expert_e(x[t]),  e = topk_ids[t, k] - first_expert,
    expert_e(x) = down[e] (act(gate) * up),  [gate; up] = gate_up[e] x

Only the chosen experts run. `gate_up` [E, 2I, H] holds each expert's gate rows then its up rows
(transformers' fused layout), `down` is [E, H, I]. A rank of expert parallelism holds E of the model's
experts, those from `first_expert` on; ids outside them contribute nothing, so each rank computes its
experts' part and an all-reduce sums the parts (docs/design.md, Parallelism). Products are summed in
fp32 and rounded to x's dtype once.

The reference is the definition; on CPU a C++ kernel (csrc/moe.cpp) computes the same with the same
ATen matrix products, without Python's loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.activations import ACTIVATIONS

torch.library.define(
    "llmc::moe",
    "(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor down, str act, int first_expert) -> Tensor",
)


def moe(x, topk_ids, topk_weights, gate_up, down, act, first_expert):
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = topk_ids - first_expert
    for e in local.unique().tolist():  # ascending, as transformers' loop over experts
        if not 0 <= e < gate_up.shape[0]:
            continue  # another rank's expert
        token, slot = torch.where(local == e)
        gate, up = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(ACTIVATIONS[act](gate) * up, down[e])
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


cpu_kernels.reference("llmc::moe", moe)
torch.library.register_fake(
    "llmc::moe", lambda x, topk_ids, topk_weights, gate_up, down, act, first_expert: torch.empty_like(x)
)
