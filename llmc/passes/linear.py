"""Linear: every linear layer becomes `llmc::linear`, whose CPU kernel reads the weights once per
decode step (see llmc/plugins/linear.py). Numerics are torch's own linear up to summation order.

Matched: `aten.linear(x, W, b)`, and `aten.addmm(b, x, W)` with a weight of its own (GPT-2's
Conv1D stores W as [in, out]; it is transposed once here, at build time).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.linear  # noqa: F401  (registers torch.ops.llmc.linear)
from llmc.passes.graph import arg, calls, find, is_weight
from llmc.passes.manager import BuildContext, register_pass
from llmc.weights import set_weight

aten = torch.ops.aten
llmc_linear = torch.ops.llmc.linear.default


@register_pass("linear")
def linear(gm: fx.GraphModule, ctx: BuildContext):
    linears = addmms = 0
    for node in find(gm, {aten.linear.default, aten.addmm.default}):
        if calls(node, aten.linear.default):
            x, w, bias = (arg(node, name) for name in ("input", "weight", "bias"))
            node.target, node.args, node.kwargs = llmc_linear, (x, w, bias), {}
            linears += 1
        elif _is_plain_addmm(node):
            bias, x, w = (arg(node, name) for name in ("self", "mat1", "mat2"))
            set_weight(gm, w.target, gm.get_buffer(w.target).t().contiguous())
            node.target, node.args, node.kwargs = llmc_linear, (x, w, bias), {}
            addmms += 1
    return gm, {"linears": linears, "addmms": addmms}


def _is_plain_addmm(node: fx.Node) -> bool:
    """addmm(bias, x, W) with beta = alpha = 1 and W a weight nothing else reads."""
    if arg(node, "beta") != 1 or arg(node, "alpha") != 1:
        return False
    w = arg(node, "mat2")
    return is_weight(w) and len(w.users) == 1
