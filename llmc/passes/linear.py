"""Linear: every linear layer becomes `llmc::linear`, whose CPU kernel reads the weights once per
decode step (see llmc/plugins/linear.py). Numerics are torch's own linear up to summation order.

Matched: `aten.linear(x, W, b)`, and `aten.addmm(b, x, W)` with a weight of its own (GPT-2's
Conv1D stores W as [in, out]; it is transposed once here, at build time).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.linear  # noqa: F401  (registers torch.ops.llmc.linear)
from llmc.passes.manager import BuildContext, register_pass
from llmc.weights import set_weight

aten = torch.ops.aten
llmc_linear = torch.ops.llmc.linear.default


@register_pass("linear")
def linear(gm: fx.GraphModule, ctx: BuildContext):
    linears = addmms = 0
    for node in gm.graph.nodes:
        if node.target == aten.linear.default:
            x, w, *rest = node.args
            node.target, node.args, node.kwargs = llmc_linear, (x, w, rest[0] if rest else node.kwargs.get("bias")), {}
            linears += 1
        elif _is_plain_addmm(node):
            bias, x, w = node.args
            set_weight(gm, w.target, gm.get_buffer(w.target).t().contiguous())
            node.target, node.args = llmc_linear, (x, w, bias)
            addmms += 1
    return gm, {"linears": linears, "addmms": addmms}


def _is_plain_addmm(node: fx.Node) -> bool:
    """addmm(bias, x, W) with beta = alpha = 1 and W a weight nothing else reads."""
    if node.target != aten.addmm.default or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return False
    w = node.args[2]
    return w.op == "get_attr" and len(w.users) == 1
