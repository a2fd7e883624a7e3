"""Fuse rotary position embedding: HF's `q * cos + rotate(q) * sin` -> `llmc::rotary_embedding(q, cos, sin,
interleaved)`, for queries and keys alike, with rotate in either of HF's forms:

- rotate_half, `cat([-x[..., d/2:], x[..., :d/2]], -1)` (Llama, Mistral, Qwen2, GPT-NeoX, whose partial
  rotary slices q before this);
- rotate_every_two, `stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)` (GPT-J, partial rotary too).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins.rotary  # noqa: F401  (registers torch.ops.llmc.rotary_embedding)
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten


def is_last_dim(dim, x) -> bool:
    return dim in (-1, x.meta["val"].dim() - 1)


def _args(node: fx.Node, defaults: tuple) -> tuple:
    """node's arguments after its input, with the schema's defaults for those the graph leaves out."""
    return (*node.args[1:], *defaults[len(node.args) - 1:])


def is_last_dim_slice(node, x, start: int, end: int, step: int = 1) -> bool:
    """node is x[..., start:end:step] (an end past x's last dim clips to it)."""
    if not (isinstance(node, fx.Node) and node.target == aten.slice.Tensor and node.args[0] is x):
        return False
    dim, lo, hi, by = _args(node, (0, None, None, 1))
    d = x.meta["val"].shape[-1]
    return is_last_dim(dim, x) and (lo or 0) == start and min(d if hi is None else hi, d) == end and by == step


def _negated(node) -> fx.Node | None:
    return node.args[0] if isinstance(node, fx.Node) and node.target == aten.neg.default else None


def _is_rotate_half(node, x) -> bool:
    """cat([-x[..., d/2:], x[..., :d/2]], -1)"""
    if not (isinstance(node, fx.Node) and node.target == aten.cat.default and len(node.args[0]) == 2):
        return False
    if len(node.args) > 1 and not is_last_dim(node.args[1], x):
        return False
    neg, first = node.args[0]
    d = x.meta["val"].shape[-1]
    return is_last_dim_slice(_negated(neg), x, d // 2, d) and is_last_dim_slice(first, x, 0, d // 2)


def _is_rotate_every_two(node, x) -> bool:
    """stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)"""
    if not (isinstance(node, fx.Node) and node.target == aten.flatten.using_ints):
        return False
    rank = x.meta["val"].dim()  # the stack has one dim more
    start, end = _args(node, (0, -1))
    stack = node.args[0]
    if not (start in (-2, rank - 1) and end in (-1, rank) and isinstance(stack, fx.Node) and stack.target == aten.stack.default
            and len(stack.args[0]) == 2 and len(stack.args) > 1 and stack.args[1] in (-1, rank)):
        return False
    neg, even = stack.args[0]
    d = x.meta["val"].shape[-1]
    return is_last_dim_slice(_negated(neg), x, 1, d, 2) and is_last_dim_slice(even, x, 0, d, 2)


def _match(add: fx.Node):
    """add(mul(x, cos), mul(rotate(x), sin)) -> (x, cos, sin, interleaved), or None."""
    muls = add.args
    if len(muls) != 2 or not all(isinstance(m, fx.Node) and m.target == aten.mul.Tensor for m in muls):
        return None
    for straight, rotated in (muls, muls[::-1]):
        for x, cos in (straight.args, straight.args[::-1]):
            if not (isinstance(x, fx.Node) and "val" in x.meta and isinstance(cos, fx.Node)):
                continue
            for turned, sin in (rotated.args, rotated.args[::-1]):
                if not isinstance(sin, fx.Node):
                    continue
                if _is_rotate_half(turned, x):
                    return x, cos, sin, False
                if _is_rotate_every_two(turned, x):
                    return x, cos, sin, True
    return None


@register_pass("fuse_rotary_embedding")
def fuse_rotary_embedding(gm: fx.GraphModule, ctx: BuildContext):
    fused: dict[str, int] = {}
    for add in [n for n in gm.graph.nodes if n.target == aten.add.Tensor]:
        match = _match(add)
        if match is None or add.meta["val"].shape != match[0].meta["val"].shape:
            continue
        with gm.graph.inserting_before(add):
            new = gm.graph.call_function(torch.ops.llmc.rotary_embedding.default, match)
        new.meta["val"] = add.meta.get("val")
        add.replace_all_uses_with(new)
        form = "interleaved" if match[3] else "rotate_half"
        fused[form] = fused.get(form, 0) + 1
    return gm, {"rotary_embeddings": fused}
