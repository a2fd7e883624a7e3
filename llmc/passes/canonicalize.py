"""Canonicalize: remove what torch.export leaves that no backend wants.

- runtime asserts on tensor metadata (they pin the traced device and block pattern matches),
- dtype/device conversions that convert nothing (`x.to(float32)` of an fp32 tensor),
- dropout in eval mode (`dropout(x, p, train=False)` is x).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}
CONVERSIONS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default}


def _is_noop_conversion(node: fx.Node) -> bool:
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src.dtype == out.dtype and "memory_format" not in node.kwargs


@register_pass("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: BuildContext):
    asserts = conversions = dropouts = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ASSERTS:
            gm.graph.erase_node(node)
            asserts += 1
        elif node.target in CONVERSIONS and _is_noop_conversion(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            conversions += 1
        elif node.target == aten.dropout.default and not node.args[2]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            dropouts += 1
    return gm, {"asserts_removed": asserts, "noop_conversions_removed": conversions, "eval_dropouts_removed": dropouts}
