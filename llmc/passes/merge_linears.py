"""Merge linears: linears that read the same input become one linear over their concatenated weights,
then a split (Q/K/V projections, gate/up). One weight stream and one kernel call instead of several;
every output element is the same dot product as before."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from llmc.passes.graph import arg, find, is_weight
from llmc.passes.manager import BuildContext, register_pass
from llmc.weights import set_weight

LINEAR = torch.ops.llmc.linear.default


def _weight(node: fx.Node) -> fx.Node | None:
    w = arg(node, "w")
    return w if is_weight(w) and len(w.users) == 1 else None


@register_pass("merge_linears")
def merge_linears(gm: fx.GraphModule, ctx: BuildContext):
    groups: dict[tuple[fx.Node, bool], list[fx.Node]] = {}  # (input, has bias) -> linears
    for node in find(gm, LINEAR):
        bias = arg(node, "bias")
        if _weight(node) is not None and (bias is None or (is_weight(bias) and len(bias.users) == 1)):
            groups.setdefault((arg(node, "x"), bias is not None), []).append(node)
    merged = []
    for (x, has_bias), linears in groups.items():
        weights = [gm.get_buffer(_weight(n).target) for n in linears]
        if len(linears) < 2 or len({w.dtype for w in weights}) != 1:
            continue
        biases = [gm.get_buffer(arg(n, "bias").target) for n in linears] if has_bias else None
        name = _weight(linears[0]).target + "_merged"
        set_weight(gm, name, torch.cat(weights))
        if biases is not None:
            set_weight(gm, name + "_bias", torch.cat(biases))
        with gm.graph.inserting_before(linears[0]):  # groups were collected in graph order
            w = gm.graph.get_attr(name)
            b = gm.graph.get_attr(name + "_bias") if biases is not None else None
            y = gm.graph.call_function(LINEAR, (x, w, b))
            parts = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (y, [t.shape[0] for t in weights], -1))
            for i, n in enumerate(linears):
                out = gm.graph.call_function(operator.getitem, (parts, i))
                n.replace_all_uses_with(out)
        for n in linears:
            gm.graph.erase_node(n)
        merged.append(len(linears))
    return gm, {"merged_groups": len(merged), "linears_merged": sum(merged)}
