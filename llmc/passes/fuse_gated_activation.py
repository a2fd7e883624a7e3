"""Fuse the gated MLP activation: `mul(act(gate), up)` -> `llmc::gated_activation(gate, up, act)`,
for act in SiLU (Llama, Mistral, Qwen2), exact GELU and tanh GELU (GeGLU models)."""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.activations  # noqa: F401  (registers torch.ops.llmc.gated_activation)
from llmc.passes.manager import BuildContext, register_pass

from llmc.passes.graph import arg, calls, find, val

aten = torch.ops.aten


def _activation(node: fx.Node) -> str | None:
    if calls(node, aten.silu.default):
        return "silu"
    if calls(node, aten.gelu.default):
        return "gelu_tanh" if arg(node, "approximate") == "tanh" else "gelu"
    return None


@register_pass("fuse_gated_activation")
def fuse_gated_activation(gm: fx.GraphModule, ctx: BuildContext):
    fused: dict[str, int] = {}
    for mul in find(gm, aten.mul.Tensor):
        a, b = mul.args
        for act_node, up in ((a, b), (b, a)):
            if not isinstance(act_node, fx.Node) or val(up) is None:
                continue
            act = _activation(act_node)
            if act is None or len(act_node.users) != 1 or val(act_node).shape != val(up).shape:
                continue
            with gm.graph.inserting_before(mul):
                new = gm.graph.call_function(torch.ops.llmc.gated_activation.default, (arg(act_node, "self"), up, act))
            mul.replace_all_uses_with(new)
            fused[act] = fused.get(act, 0) + 1
            break
    return gm, {"gated_activations": fused}
