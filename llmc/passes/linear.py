"""Linear: every `aten.linear` becomes `llmc::linear`, whose CPU kernel reads the weights once per
decode step (see llmc/plugins/linear.py). Numerics are torch's own linear up to summation order."""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.linear  # noqa: F401  (registers torch.ops.llmc.linear)
from llmc.passes.manager import BuildContext, register_pass


@register_pass("linear")
def linear(gm: fx.GraphModule, ctx: BuildContext):
    count = 0
    for node in gm.graph.nodes:
        if node.target == torch.ops.aten.linear.default:
            x, w, *rest = node.args
            node.target = torch.ops.llmc.linear.default
            node.args = (x, w, rest[0] if rest else node.kwargs.get("bias"))
            node.kwargs = {}
            count += 1
    return gm, {"linears": count}
