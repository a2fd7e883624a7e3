"""Eager attention: a model that computes attention in its own code (Bloom) -> the traced attention node.

Bloom does not call transformers' attention interface: it computes, per layer and for one sequence,
`softmax(view(baddbmm(bias, q, k^T, beta=1, alpha=scale)) + mask) @ v` with q, k, v [heads, T, d] and `mask`
transformers' causal mask (an `llmc_trace::causal_mask` node). This pass rewrites exactly that pattern as
`llmc_trace::attention(q, k, v, where(mask, bias, -inf), scale)`, the node llmc's attention implementation
makes, so that the attention pass proves the bias (ALiBi) as it proves any other mask. Anything else is left
as it is, and the attention pass refuses a model whose layers do not all reach it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.frontend.attention_interface  # noqa: F401  (registers torch.ops.llmc_trace)
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten
CAUSAL_MASK = torch.ops.llmc_trace.causal_mask.default
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}


def _through(node, targets: set):
    while isinstance(node, fx.Node) and node.target in targets:
        node = node.args[0]
    return node


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """A new node whose meta["val"] is `target` run on its arguments' (fake) values."""
    node = graph.call_function(target, args)
    values = fx.node.map_arg(args, lambda a: a.meta["val"])
    node.meta["val"] = target(*values)
    return node


def _match(bmm: fx.Node):
    """(bias, q, k^T, scale, mask, v) of the pattern ending at `bmm`, else None."""
    softmax = _through(bmm.args[0], VIEWS | {aten._to_copy.default, aten.to.dtype})
    if not isinstance(softmax, fx.Node) or softmax.target not in SOFTMAX or softmax.args[1] not in (-1, 3):
        return None
    add = softmax.args[0]
    if not isinstance(add, fx.Node) or add.target != aten.add.Tensor or len(add.args) != 2:
        return None
    scores, mask = add.args
    baddbmm = _through(scores, VIEWS)
    if not isinstance(mask, fx.Node) or mask.target != CAUSAL_MASK or baddbmm.target != aten.baddbmm.default:
        return None
    if baddbmm.kwargs.get("beta", 1) != 1 or len(baddbmm.args) != 3:
        return None
    bias, q, k_t = baddbmm.args
    if q.meta["val"].dim() != 3 or bias.meta["val"].dim() != 3:
        return None
    return bias, q, k_t, float(baddbmm.kwargs.get("alpha", 1.0)), mask, bmm.args[1]


@register_pass("eager_attention")
def eager_attention(gm: fx.GraphModule, ctx: BuildContext):
    graph = gm.graph
    matched = 0
    for bmm in [n for n in graph.nodes if n.target == aten.bmm.default]:
        found = _match(bmm)
        if found is None:
            continue
        bias, q, k_t, scale, mask, v = found
        with graph.inserting_before(bmm):
            q4, v4 = _call(graph, aten.unsqueeze.default, q, 0), _call(graph, aten.unsqueeze.default, v, 0)
            k4 = _call(graph, aten.unsqueeze.default, _call(graph, aten.transpose.int, k_t, 1, 2), 0)
            biased = _call(graph, aten.where.ScalarOther, mask, _call(graph, aten.unsqueeze.default, bias, 0), float("-inf"))
            attention = _call(graph, torch.ops.llmc_trace.attention.default, q4, k4, v4, biased, scale, 0.0, None)
            out = _call(graph, aten.squeeze.dim, attention, 0)
        bmm.replace_all_uses_with(out)
        graph.erase_node(bmm)
        matched += 1
    return gm, {"matched": matched}
