"""Fold RoPE into the attention op: `paged_attention(rope(q), rope(k), v, ...)` -> `paged_attention(q, k, v, ...,
cos=, sin=, rotary_interleaved=)`, so the kernel rotates q and k as it reads them (no rotated copies).

A query or key is matched in the shapes fuse_rotary_embedding leaves:
- `rotary_embedding(x, cos, sin)` on the whole head (Llama, Mistral, Qwen2);
- `cat([rotary_embedding(x[..., :r], cos, sin), x[..., r:]], -1)`, partial rotary (GPT-NeoX, GPT-J);
- either, then `transpose(1, 2)` from [1, T, heads, D] (GPT-J rotates before it transposes).
q and k must share cos, sin and the pairing. cos / sin are broadcast over heads, so they reshape to the
op's [T, rotary_dim].

It runs after calibration and the FP8 KV cache pass: calibration records the amax of the keys the
cache stores, which are the rotated ones.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.plugins  # noqa: F401  (registers torch.ops.llmc.*)
from llmc.passes.fuse_rotary_embedding import is_last_dim, is_last_dim_slice
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten
ATTENTION, ROTARY = torch.ops.llmc.paged_attention.default, torch.ops.llmc.rotary_embedding.default


def _only_user(node, user: fx.Node) -> bool:
    return isinstance(node, fx.Node) and list(node.users) == [user]


def _rope_args(rope: fx.Node) -> tuple:
    """(cos, sin, interleaved) of a rotary_embedding node."""
    return (*rope.args[1:3], rope.args[3] if len(rope.args) > 3 else rope.kwargs.get("interleaved", False))


def _same_value(a, b) -> bool:
    """a and b are one node, or the same op of the same values (GPT-J computes cos / sin once per tensor)."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return a == b
    if a is b:
        return True
    return (a.op == b.op == "call_function" and a.target == b.target and len(a.args) == len(b.args)
            and a.kwargs == b.kwargs and all(_same_value(x, y) for x, y in zip(a.args, b.args)))


def _unrotated(x: fx.Node, user: fx.Node):
    """x = RoPE(source) in a form above, read only by `user`: (source, transposed, (cos, sin, interleaved)), or None."""
    transposed = x.target == aten.transpose.int and sorted(x.args[1:]) == [1, 2] and _only_user(x, user)
    if transposed:
        x, user = x.args[0], x
    if not _only_user(x, user):
        return None
    if x.target == ROTARY:
        return x.args[0], transposed, _rope_args(x)
    if x.target != aten.cat.default or len(x.args[0]) != 2 or not is_last_dim(x.args[1] if len(x.args) > 1 else 0, x):
        return None
    rope, rest = x.args[0]
    if not (_only_user(rope, x) and rope.target == ROTARY and isinstance(rest, fx.Node)):
        return None
    source, dim = rest.args[0], rope.meta["val"].shape[-1]
    if not (is_last_dim_slice(rope.args[0], source, 0, dim) and is_last_dim_slice(rest, source, dim, source.meta["val"].shape[-1])):
        return None
    return source, transposed, _rope_args(rope)


def _transposed(graph: fx.Graph, x: fx.Node, attention: fx.Node) -> fx.Node:
    """x [1, T, heads, D] as [1, heads, T, D], with its shape known to the backends that read it."""
    with graph.inserting_before(attention):
        out = graph.call_function(aten.transpose.int, (x, 1, 2))
    out.meta["val"] = x.meta["val"].transpose(1, 2)
    return out


def _rows(graph: fx.Graph, table: fx.Node, made: dict[fx.Node, fx.Node]) -> fx.Node:
    """cos or sin, broadcast over heads, as the op's [T, rotary_dim]: one reshape a table, right after it, which
    every layer reading the table shares (`made`). HF unsqueezes the table for the heads in each layer: the
    reshape reads what was unsqueezed, so the layers find one table."""
    while table.target == aten.unsqueeze.default:
        table = table.args[0]
    if table not in made:
        dim = table.meta["val"].shape[-1]
        with graph.inserting_after(table):
            made[table] = graph.call_function(aten.reshape.default, (table, [-1, dim]))
        made[table].meta["val"] = table.meta["val"].reshape(-1, dim)
    return made[table]


@register_pass("fold_rotary_into_attention")
def fold_rotary_into_attention(gm: fx.GraphModule, ctx: BuildContext):
    folded: dict[str, int] = {}
    rows: dict[fx.Node, fx.Node] = {}
    for attention in [n for n in gm.graph.nodes if n.target == ATTENTION and "cos" not in n.kwargs]:
        q, k = (_unrotated(x, attention) for x in attention.args[:2])
        if q is None or k is None or q[1] != k[1] or not all(map(_same_value, q[2], k[2])):
            continue
        heads = [q[0], k[0]]
        if q[1]:  # RoPE ran on [1, T, heads, D]: the op reads the transpose of what it rotated
            heads = [_transposed(gm.graph, h, attention) for h in heads]
        cos, sin, interleaved = q[2]
        attention.args = (*heads, *attention.args[2:])
        attention.kwargs = {**attention.kwargs, "cos": _rows(gm.graph, cos, rows), "sin": _rows(gm.graph, sin, rows),
                            "rotary_interleaved": interleaved}
        form = "interleaved" if interleaved else "rotate_half"
        folded[form] = folded.get(form, 0) + 1
    return gm, {"attentions": folded}
