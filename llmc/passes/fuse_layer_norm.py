"""Fuse LayerNorm with the residual add before it (GPT-2, GPT-J, GPT-NeoX; DeepSpeed-Inference's
"bias + residual + LayerNorm" region, the linears' biases being inside llmc::linear already):

    layer_norm(add(a, b), [H], w, bias, eps)  ->  llmc::add_layer_norm(a, b, w, bias, eps) -> (normalised, a + b)

The sum goes on to the add's other users (the next residual, and in GPT-NeoX's parallel block the
second LayerNorm of the same sum, which stays torch's: one fused op per add).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.norms  # noqa: F401  (registers torch.ops.llmc.add_layer_norm)
from llmc.passes.fuse_rms_norm import fuse_residual_add
from llmc.passes.manager import BuildContext, register_pass

from llmc.passes.graph import arg, find, is_weight, val

aten = torch.ops.aten


def _norm_args(gm: fx.GraphModule, node: fx.Node) -> tuple | None:
    """(w, bias, eps) of a LayerNorm over the last dim with weights of the input's dtype, else None."""
    x, shape, w, bias = (arg(node, name) for name in ("input", "normalized_shape", "weight", "bias"))
    if len(shape) != 1 or not all(is_weight(t) for t in (w, bias)):
        return None
    if any(gm.get_buffer(t.target).dtype != val(x).dtype for t in (w, bias)):
        return None
    return w, bias, float(arg(node, "eps"))


@register_pass("fuse_layer_norm")
def fuse_layer_norm(gm: fx.GraphModule, ctx: BuildContext):
    layer_norms = fused = 0
    for node in find(gm, aten.layer_norm.default):
        layer_norms += 1
        args = _norm_args(gm, node)
        if args is not None:
            fused += fuse_residual_add(gm, node, torch.ops.llmc.add_layer_norm.default, args)
    return gm, {"layer_norms": layer_norms, "with_residual_add": fused}
