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

from llmc.passes.graph import CASTS, arg, calls, find, is_weight, only_user, val

aten = torch.ops.aten
NORM_CASTS = frozenset({aten.to.dtype, aten._to_copy.default}) & CASTS


def _match(rsqrt: fx.Node):
    """(x, weight, eps, output node) of the RMSNorm around this rsqrt, or None."""
    add = arg(rsqrt, "self")
    if not calls(add, aten.add.Tensor) or not isinstance(arg(add, "other"), float):
        return None
    mean = arg(add, "self")
    if not calls(mean, aten.mean.dim) or list(arg(mean, "dim") or []) != [-1] or not arg(mean, "keepdim"):
        return None
    pow_ = arg(mean, "self")
    if not calls(pow_, aten.pow.Tensor_Scalar) or arg(pow_, "exponent") != 2:
        return None
    h = arg(pow_, "self")
    scaled = next((u for u in rsqrt.users if calls(u, aten.mul.Tensor) and set(u.args) == {h, rsqrt}), None)
    if scaled is None or len(rsqrt.users) != 1:
        return None
    cast = only_user(scaled, NORM_CASTS)
    out = only_user(cast or scaled, aten.mul.Tensor)
    if out is None:
        return None
    w = next((a for a in out.args if a is not (cast or scaled)), None)
    if not is_weight(w):
        return None
    x = h.args[0] if calls(h, NORM_CASTS) else h
    return x, w, arg(add, "other"), out


@register_pass("fuse_rms_norm")
def fuse_rms_norm(gm: fx.GraphModule, ctx: BuildContext):
    count = 0
    for rsqrt in find(gm, aten.rsqrt.default):
        match = _match(rsqrt)
        if match is None:
            continue
        x, w, eps, out = match
        if gm.get_buffer(w.target).dtype != val(x).dtype:
            continue
        with gm.graph.inserting_before(out):
            fused = gm.graph.call_function(torch.ops.llmc.rms_norm.default, (x, w, eps))
        out.replace_all_uses_with(fused)
        count += 1
    gm.graph.eliminate_dead_code()  # the unfused chains still read the adds
    norms = find(gm, torch.ops.llmc.rms_norm.default)
    added = sum(fuse_residual_add(gm, norm, torch.ops.llmc.add_rms_norm.default, norm.args[1:]) for norm in norms)
    return gm, {"rms_norms": count, "with_residual_add": added}


def fuse_residual_add(gm: fx.GraphModule, norm: fx.Node, fused_op, norm_args: tuple) -> int:
    """norm(add(a, b), *norm_args) -> fused_op(a, b, *norm_args), which returns (normalised, a + b)."""
    add = norm.args[0]
    if not calls(add, aten.add.Tensor) or add.kwargs or len(add.args) != 2 or not all(val(a) is not None for a in add.args):
        return 0
    a, b = add.args
    if val(a).shape != val(b).shape or val(a).dtype != val(b).dtype:
        return 0
    with gm.graph.inserting_before(add.next):  # where the sum was: every user of either comes later
        fused = gm.graph.call_function(fused_op, (a, b, *norm_args))
        normed = gm.graph.call_function(operator.getitem, (fused, 0))
        total = gm.graph.call_function(operator.getitem, (fused, 1))
    norm.replace_all_uses_with(normed)
    add.replace_all_uses_with(total)
    return 1
