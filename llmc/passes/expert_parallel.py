"""Expert parallel: keep rank (ep_rank, tp_rank)'s part of every MoE layer (llmc::moe, and a pre-quantized
checkpoint's llmc::fp8_moe / llmc::nvfp4_moe, whose scales are cut with the weights they scale).

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

llmc = torch.ops.llmc
# Each MoE op's expert tensors -> how a rank's share of the experts' features is cut from them: "halves" ([gate; up]
# output features on dim 1, each half cut alike), an int (input features on dim 2, that many per column: an E2M1 byte
# holds 2, an NVFP4 block scale covers 16), or None (per expert only: per output feature of down, or per expert).
# The quantized ops are a pre-quantized checkpoint's experts (llmc/frontend/prequantized_experts.py).
EXPERT_TENSORS = {
    llmc.moe.default: {"gate_up": "halves", "down": 1},
    llmc.fp8_moe.default: {"gate_up": "halves", "gate_up_scale": "halves", "down": 1, "down_scale": None},
    llmc.nvfp4_moe.default: {"gate_up": "halves", "gate_up_scale": "halves", "gate_up_global_scale": None, "down": 2,
                             "down_scale": 16, "down_global_scale": None},
}


@register_pass("expert_parallel", sharding=True)
def expert_parallel(gm: fx.GraphModule, ctx: BuildContext):
    layers = [n for n in gm.graph.nodes if n.target in EXPERT_TENSORS]
    tp, ep = ctx.tp_size, ctx.ep_size
    if not layers:
        if ep > 1:
            raise PassError(f"ep={ep} splits the experts of MoE layers, and this model has none; build it with ep=1")
        return gm, {}
    if tp * ep == 1:
        return gm, {}
    for node in layers:
        tensors = {name: arg(node, name) for name in EXPERT_TENSORS[node.target]}
        gate_up_bias, down_bias = arg(node, "gate_up_bias"), arg(node, "down_bias")
        if any(w is not None and w.op != "get_attr" for w in (*tensors.values(), gate_up_bias, down_bias)):
            raise PassError(f"expert_parallel: {node.format_node()} does not read its expert weights directly")
        down = gm.get_buffer(tensors["down"].target)
        experts, intermediate = down.shape[0], down.shape[2] * EXPERT_TENSORS[node.target]["down"]
        if experts % ep:
            raise PassError(f"ep={ep} does not divide the {experts} experts of an MoE layer")
        if intermediate % tp:
            raise PassError(f"tp={tp} does not divide the {intermediate} intermediate features of an MoE layer's experts")
        per_rank, width = experts // ep, intermediate // tp
        first = ctx.ep_rank * per_rank
        mine = slice(first, first + per_rank)
        features = slice(ctx.tp_rank * width, (ctx.tp_rank + 1) * width)
        for name, cut in EXPERT_TENSORS[node.target].items():
            value = gm.get_buffer(tensors[name].target)[mine]
            if cut == "halves":
                gate, up = value.chunk(2, dim=1)
                value = torch.cat([gate[:, features], up[:, features]], dim=1)
            elif cut is not None:
                if width % cut:
                    raise PassError(f"tp={tp} gives each rank {width} of an MoE layer's {intermediate} intermediate "
                                    f"features, which cuts the {name} of its quantized experts ({cut} features a column)")
                value = value[:, :, features.start // cut:features.stop // cut]
            set_weight(gm, tensors[name].target, value.contiguous())
        if gate_up_bias is not None:
            gate, up = gm.get_buffer(gate_up_bias.target)[mine].chunk(2, dim=1)
            set_weight(gm, gate_up_bias.target, torch.cat([gate[:, features], up[:, features]], dim=1).contiguous())
        if down_bias is not None:
            if ctx.tp_rank == 0:
                set_weight(gm, down_bias.target, gm.get_buffer(down_bias.target)[mine].contiguous())
            else:
                set_arg(node, "down_bias", None)
        set_arg(node, "first_expert", arg(node, "first_expert") + first)
        with gm.graph.inserting_after(node):
            reduced = gm.graph.call_function(torch.ops.llmc.expert_all_reduce.default, (node,))
        reduced.meta = dict(node.meta)
        node.replace_all_uses_with(reduced, delete_user_cb=lambda u: u is not reduced)
    return gm, {"moe_layers": len(layers), "experts_per_rank": per_rank, "expert_features_per_rank": width}
