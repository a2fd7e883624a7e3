"""Fuse the gated MLP activation: `mul(act(gate), up)` -> `llmc::gated_activation(gate, up, act)`,
for act in SiLU (Llama, Mistral, Qwen2), exact GELU and tanh GELU (GeGLU models)."""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.activations  # noqa: F401  (registers torch.ops.llmc.gated_activation)
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten


def _activation(node: fx.Node) -> str | None:
    if node.target == aten.silu.default:
        return "silu"
    if node.target == aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh" else "gelu"
    return None


@register_pass("fuse_gated_activation")
def fuse_gated_activation(gm: fx.GraphModule, ctx: BuildContext):
    fused: dict[str, int] = {}
    for mul in [n for n in gm.graph.nodes if n.target == aten.mul.Tensor]:
        a, b = mul.args
        for act_node, up in ((a, b), (b, a)):
            if not isinstance(act_node, fx.Node) or not isinstance(up, fx.Node):
                continue
            act = _activation(act_node)
            if act is None or len(act_node.users) != 1 or act_node.meta["val"].shape != up.meta["val"].shape:
                continue
            with gm.graph.inserting_before(mul):
                new = gm.graph.call_function(torch.ops.llmc.gated_activation.default, (act_node.args[0], up, act))
            new.meta["val"] = mul.meta.get("val")
            mul.replace_all_uses_with(new)
            fused[act] = fused.get(act, 0) + 1
            break
    return gm, {"gated_activations": fused}
