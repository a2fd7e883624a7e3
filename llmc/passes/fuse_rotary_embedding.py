"""Fuse rotary position embedding: HF's `q * cos + rotate_half(q) * sin` (six ops: two slices, neg,
cat, two muls and the add) -> `llmc::rotary_embedding(q, cos, sin)`, for queries and keys alike.

Matched: the rotate-half form of Llama, Mistral, Qwen2 and GPT-NeoX (partial rotary included: it
slices q before this). GPT-J's interleaved form (rotate every two) is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.rotary  # noqa: F401  (registers torch.ops.llmc.rotary_embedding)
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten


def _last_dim_slice(node, x, start: int, end: int) -> bool:
    if not (isinstance(node, fx.Node) and node.target == aten.slice.Tensor and node.args[0] is x):
        return False
    dim, lo, hi = (list(node.args[1:]) + [0, None, None])[:3]
    return dim in (-1, x.meta["val"].dim() - 1) and lo == start and (hi is None or hi >= end)


def _is_rotate_half(node, x) -> bool:
    """cat([-x[..., d/2:], x[..., :d/2]], -1)"""
    if not (isinstance(node, fx.Node) and node.target == aten.cat.default and len(node.args[0]) == 2):
        return False
    if len(node.args) > 1 and node.args[1] not in (-1, x.meta["val"].dim() - 1):
        return False
    neg, first = node.args[0]
    d = x.meta["val"].shape[-1]
    return (isinstance(neg, fx.Node) and neg.target == aten.neg.default and _last_dim_slice(neg.args[0], x, d // 2, d)
            and _last_dim_slice(first, x, 0, d // 2))


def _match(add: fx.Node):
    """add(mul(x, cos), mul(rotate_half(x), sin)) -> (x, cos, sin), or None."""
    muls = add.args
    if len(muls) != 2 or not all(isinstance(m, fx.Node) and m.target == aten.mul.Tensor for m in muls):
        return None
    for straight, rotated in (muls, muls[::-1]):
        for x, cos in (straight.args, straight.args[::-1]):
            for half, sin in (rotated.args, rotated.args[::-1]):
                if isinstance(x, fx.Node) and "val" in x.meta and isinstance(cos, fx.Node) and isinstance(sin, fx.Node) \
                        and _is_rotate_half(half, x):
                    return x, cos, sin
    return None


@register_pass("fuse_rotary_embedding")
def fuse_rotary_embedding(gm: fx.GraphModule, ctx: BuildContext):
    fused = 0
    for add in [n for n in gm.graph.nodes if n.target == aten.add.Tensor]:
        match = _match(add)
        if match is None or add.meta["val"].shape != match[0].meta["val"].shape:
            continue
        with gm.graph.inserting_before(add):
            new = gm.graph.call_function(torch.ops.llmc.rotary_embedding.default, match)
        new.meta["val"] = add.meta.get("val")
        add.replace_all_uses_with(new)
        fused += 1
    return gm, {"rotary_embeddings": fused}
