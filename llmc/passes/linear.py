"""Linear: every linear layer becomes `llmc::linear`, whose CPU kernel reads the weights once per
decode step (see llmc/plugins/linear.py). Numerics are torch's own linear up to summation order.

Matched: `aten.linear(x, W, b)`, `aten.addmm(b, x, W)` with a weight of its own (GPT-2's
Conv1D stores W as [in, out]; it is transposed once here, at build time), and `x @ W.T [+ b]` (Falcon's own
linear), so that every pass after this one finds the model's projections.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.linear  # noqa: F401  (registers torch.ops.llmc.linear)
from llmc.passes.graph import arg, calls, find, is_weight, only_user, val
from llmc.passes.manager import BuildContext, register_pass
from llmc.weights import set_weight

aten = torch.ops.aten
llmc_linear = torch.ops.llmc.linear.default


@register_pass("linear")
def linear(gm: fx.GraphModule, ctx: BuildContext):
    linears = addmms = matmuls = 0
    for node in find(gm, aten.matmul.default):
        w = _transposed_weight(arg(node, "other"))
        if w is None:
            continue
        x, bias = arg(node, "self"), None
        add = only_user(node, aten.add.Tensor)
        if add is not None and add.args[0] is node and is_weight(add.args[1]) and val(add.args[1]).shape == val(node).shape[-1:]:
            bias = add.args[1]
            add.replace_all_uses_with(node)
        node.target, node.args, node.kwargs = llmc_linear, (x, w, bias), {}
        matmuls += 1
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
    return gm, {"linears": linears, "addmms": addmms, "matmuls": matmuls}


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """W of `W.T` (numpy_T, t, or transpose/permute of its two dims) for a 2-D weight W; else None."""
    transposes = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}
    if not calls(node, transposes) or not is_weight(node.args[0]) or val(node.args[0]).dim() != 2:
        return None
    if calls(node, aten.permute.default) and list(node.args[1]) != [1, 0]:
        return None
    return node.args[0]


def _is_plain_addmm(node: fx.Node) -> bool:
    """addmm(bias, x, W) with beta = alpha = 1 and W a weight nothing else reads."""
    if arg(node, "beta") != 1 or arg(node, "alpha") != 1:
        return False
    w = arg(node, "mat2")
    return is_weight(w) and len(w.users) == 1
