"""Expert parallel: keep rank (ep_rank, tp_rank)'s part of every MoE layer (llmc::moe).

A pipeline stage has tp x ep ranks. Attention and dense layers are tensor parallel over tp and replicated
across ep (tensor_parallel). Each MoE layer's experts are split over ep, E/ep consecutive experts a rank,
and each of those experts' weights over tp (gate and up by output features, down by input features, as a
dense MLP's; gate/up biases as their features, down biases on tp rank 0 alone, as they are added once). Every
rank computes its experts' part of the output for all tokens; one llmc::expert_all_reduce over the stage's
tp x ep ranks sums the parts (docs/design.md, Parallelism).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.collectives  # noqa: F401  (registers torch.ops.llmc.expert_all_reduce)
import llmc.plugins.moe  # noqa: F401  (registers torch.ops.llmc.moe)
from llmc.passes.graph import arg, set_arg
from llmc.passes.manager import BuildContext, PassError, register_pass
from llmc.weights import set_weight

MOE = torch.ops.llmc.moe.default


@register_pass("expert_parallel", sharding=True)
def expert_parallel(gm: fx.GraphModule, ctx: BuildContext):
    layers = [n for n in gm.graph.nodes if n.target == MOE]
    tp, ep = ctx.tp_size, ctx.ep_size
    if not layers:
        if ep > 1:
            raise PassError(f"ep={ep} splits the experts of MoE layers, and this model has none; build it with ep=1")
        return gm, {}
    if tp * ep == 1:
        return gm, {}
    for node in layers:
        gate_up_node, down_node = node.args[3], node.args[4]
        gate_up_bias, down_bias = arg(node, "gate_up_bias"), arg(node, "down_bias")
        if any(w is not None and w.op != "get_attr" for w in (gate_up_node, down_node, gate_up_bias, down_bias)):
            raise PassError(f"expert_parallel: {node.format_node()} does not read its expert weights directly")
        gate_up, down = gm.get_buffer(gate_up_node.target), gm.get_buffer(down_node.target)
        experts, intermediate = down.shape[0], down.shape[2]
        if experts % ep:
            raise PassError(f"ep={ep} does not divide the {experts} experts of an MoE layer")
        if intermediate % tp:
            raise PassError(f"tp={tp} does not divide the {intermediate} intermediate features of an MoE layer's experts")
        per_rank, width = experts // ep, intermediate // tp
        first = ctx.ep_rank * per_rank
        mine = slice(first, first + per_rank)
        features = slice(ctx.tp_rank * width, (ctx.tp_rank + 1) * width)
        gate, up = gate_up[mine].chunk(2, dim=1)
        set_weight(gm, gate_up_node.target, torch.cat([gate[:, features], up[:, features]], dim=1).contiguous())
        set_weight(gm, down_node.target, down[mine, :, features].contiguous())
        if gate_up_bias is not None:
            gate, up = gm.get_buffer(gate_up_bias.target)[mine].chunk(2, dim=1)
            set_weight(gm, gate_up_bias.target, torch.cat([gate[:, features], up[:, features]], dim=1).contiguous())
        if down_bias is not None:
            if ctx.tp_rank == 0:
                set_weight(gm, down_bias.target, gm.get_buffer(down_bias.target)[mine].contiguous())
            else:
                set_arg(node, "down_bias", None)
        node.update_arg(6, node.args[6] + first)
        with gm.graph.inserting_after(node):
            reduced = gm.graph.call_function(torch.ops.llmc.expert_all_reduce.default, (node,))
        reduced.meta = dict(node.meta)
        node.replace_all_uses_with(reduced, delete_user_cb=lambda u: u is not reduced)
    return gm, {"moe_layers": len(layers), "experts_per_rank": per_rank, "expert_features_per_rank": width}
