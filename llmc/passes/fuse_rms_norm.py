"""Fuse RMSNorm: HF's RMSNorm, as torch.export spells it, becomes one `llmc::rms_norm`.

    [h = x.to(float32)]  pow(h, 2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(h, .) -> [to(x.dtype)] -> mul(w, .)

(the casts are there in bf16/fp16 builds; canonicalize removes them in fp32 ones). A residual
`add(a, b)` that feeds the norm joins it: `llmc::add_rms_norm(a, b, w, eps)` returns the normalised
tensor and the sum, which goes on to the add's other users (the next residual).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import llmc.plugins.norms  # noqa: F401  (registers torch.ops.llmc.rms_norm)
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten
CASTS = (aten.to.dtype, aten._to_copy.default)


def _only_user(node: fx.Node, target) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target in (target if isinstance(target, tuple) else (target,)) else None


def _match(rsqrt: fx.Node):
    """(x, weight, eps, output node) of the RMSNorm around this rsqrt, or None."""
    add = rsqrt.args[0]
    if add.target != aten.add.Tensor or not isinstance(add.args[1], float):
        return None
    mean = add.args[0]
    if mean.target != aten.mean.dim or list(mean.args[1]) != [-1] or not mean.args[2]:
        return None
    pow_ = mean.args[0]
    if pow_.target != aten.pow.Tensor_Scalar or pow_.args[1] != 2:
        return None
    h = pow_.args[0]
    scaled = next((u for u in rsqrt.users if u.target == aten.mul.Tensor and set(u.args) == {h, rsqrt}), None)
    if scaled is None or len(rsqrt.users) != 1:
        return None
    cast = _only_user(scaled, CASTS)
    out = _only_user(cast or scaled, aten.mul.Tensor)
    if out is None:
        return None
    w = next((a for a in out.args if a is not (cast or scaled)), None)
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    x = h.args[0] if h.target in CASTS else h
    return x, w, add.args[1], out


@register_pass("fuse_rms_norm")
def fuse_rms_norm(gm: fx.GraphModule, ctx: BuildContext):
    count = 0
    for rsqrt in [n for n in gm.graph.nodes if n.target == aten.rsqrt.default]:
        match = _match(rsqrt)
        if match is None:
            continue
        x, w, eps, out = match
        if gm.get_buffer(w.target).dtype != x.meta["val"].dtype:
            continue
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(torch.ops.llmc.rms_norm.default, (x, w, eps))
        fused.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(fused)
        count += 1
    gm.graph.eliminate_dead_code()  # the unfused chains still read the adds
    norms = [n for n in gm.graph.nodes if n.target == torch.ops.llmc.rms_norm.default]
    added = sum(fuse_residual_add(gm, norm, torch.ops.llmc.add_rms_norm.default, norm.args[1:]) for norm in norms)
    return gm, {"rms_norms": count, "with_residual_add": added}


def fuse_residual_add(gm: fx.GraphModule, norm: fx.Node, fused_op, norm_args: tuple) -> int:
    """norm(add(a, b), *norm_args) -> fused_op(a, b, *norm_args), which returns (normalised, a + b)."""
    add = norm.args[0]
    if add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return 0
    a, b = add.args
    if a.meta["val"].shape != b.meta["val"].shape or a.meta["val"].dtype != b.meta["val"].dtype:
        return 0
    with gm.graph.inserting_before(add.next):  # where the sum was: every user of either comes later
        fused = gm.graph.call_function(fused_op, (a, b, *norm_args))
        normed = gm.graph.call_function(operator.getitem, (fused, 0))
        total = gm.graph.call_function(operator.getitem, (fused, 1))
    normed.meta["val"], total.meta["val"] = norm.meta.get("val"), add.meta.get("val")
    norm.replace_all_uses_with(normed)
    add.replace_all_uses_with(total)
    return 1
