"""Canonicalize: remove what torch.export leaves that no backend wants.

- runtime asserts on tensor metadata (they pin the traced device and block pattern matches),
- dtype/device conversions that convert nothing (`x.to(float32)` of an fp32 tensor),
- dropout in eval mode (`dropout(x, p, train=False)` is x).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, register_pass

from llmc.passes.graph import ASSERTS, CASTS, arg, calls, val

aten = torch.ops.aten


def _is_noop_conversion(node: fx.Node) -> bool:
    src, out = val(node.args[0]), val(node)
    if src is None or out is None:
        return False
    return src.dtype == out.dtype and "memory_format" not in node.kwargs


@register_pass("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: BuildContext):
    asserts = conversions = dropouts = 0
    for node in list(gm.graph.nodes):
        if calls(node, ASSERTS):
            gm.graph.erase_node(node)
            asserts += 1
        elif calls(node, CASTS) and _is_noop_conversion(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            conversions += 1
        elif calls(node, aten.dropout.default) and not arg(node, "train"):
            node.replace_all_uses_with(arg(node, "input"))
            gm.graph.erase_node(node)
            dropouts += 1
    return gm, {"asserts_removed": asserts, "noop_conversions_removed": conversions, "eval_dropouts_removed": dropouts}
