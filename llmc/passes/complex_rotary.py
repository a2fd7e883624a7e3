"""Complex RoPE: RoPE written as complex multiplication (DeepSeek-V2, Llama 4) -> `llmc::rotary_embedding`.

transformers writes it as
    table = polar(ones_like(angle), angle), then scaled by a number, unsqueezed, viewed   # complex [..., D/2]
    out = view_as_real(view_as_complex(x.reshape(..., D/2, 2)) * table).flatten(-2)
which turns the pair (x[2i], x[2i+1]) as one complex number by angle_i: out[2i] = x[2i] cos - x[2i+1] sin and
out[2i+1] = x[2i+1] cos + x[2i] sin. That is the op's interleaved pairing (GPT-J's) with cos and sin each
repeated twice, the table's real and imaginary parts followed through the same moves and scalings.

Only that is lowered; any other use of complex numbers is a PassError naming it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import llmc.plugins.rotary  # noqa: F401  (registers torch.ops.llmc.rotary_embedding)
from llmc.passes.graph import arg, calls, find, val
from llmc.passes.manager import BuildContext, PassError, register_pass

aten = torch.ops.aten
COMPLEX_OPS = frozenset({aten.polar.default, aten.view_as_complex.default, aten.view_as_real.default})
# Ops that move a table's values without mixing real and imaginary parts: each applies to both parts alike.
MOVES = frozenset({aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default,
                   aten.slice.Tensor, aten.clone.default, aten.contiguous.default})


def _is_complex(node) -> bool:
    v = val(node)
    return v is not None and v.is_complex()


def _parts(graph: fx.Graph, table: fx.Node, memo: dict) -> tuple[fx.Node, fx.Node] | None:
    """(real, imaginary) part of the complex `table` as real nodes, or None where it is not a polar table."""
    if table in memo:
        return memo[table]
    parts = None
    if calls(table, aten.polar.default):
        magnitude, angle = table.args
        with graph.inserting_before(table.next):
            parts = [graph.call_function(aten.cos.default, (angle,)), graph.call_function(aten.sin.default, (angle,))]
            if not calls(magnitude, aten.ones_like.default):
                parts = [graph.call_function(aten.mul.Tensor, (magnitude, p)) for p in parts]
    elif calls(table, aten.mul.Tensor) and len(table.args) == 2:
        by_number = [(c, r) for c, r in (table.args, table.args[::-1]) if _is_complex(c) and not _is_complex(r)
                     and (isinstance(r, (int, float)) or val(r) is not None)]
        inner = by_number and _parts(graph, by_number[0][0], memo)
        if inner:
            with graph.inserting_before(table.next):
                parts = [graph.call_function(aten.mul.Tensor, (p, by_number[0][1])) for p in inner]
    elif calls(table, MOVES) and not table.kwargs:
        inner = _parts(graph, table.args[0], memo)
        if inner:
            with graph.inserting_before(table.next):
                parts = [graph.call_function(table.target, (p, *table.args[1:])) for p in inner]
    memo[table] = parts and tuple(parts)
    return memo[table]


def _pairs_of(node) -> fx.Node | None:
    """x where `node` is x.reshape(..., D/2, 2): x's last dim cut into (real, imaginary) pairs; else None."""
    if not calls(node, (aten.reshape.default, aten.view.default)) or not isinstance(node.args[0], fx.Node):
        return None
    x, pairs = val(node.args[0]), val(node)
    if x is None or pairs is None or pairs.dim() != x.dim() + 1 or pairs.shape[-1] != 2 or x.dtype != torch.float32:
        return None
    same = _same_sizes(x.shape[:-1], pairs.shape[:-2])
    return node.args[0] if same and statically_known_true(x.shape[-1] == 2 * pairs.shape[-2]) else None


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _flattens_pairs(node: fx.Node, rank: int) -> bool:
    """node is flatten(-2, -1) of a [..., D/2, 2] tensor of `rank` dims."""
    if not calls(node, aten.flatten.using_ints):
        return False
    start, end = arg(node, "start_dim"), arg(node, "end_dim")
    return start in (-2, rank - 2) and end in (-1, rank - 1)


def _match(graph: fx.Graph, real: fx.Node, memo: dict):
    """real = view_as_real(view_as_complex(x as pairs) * table), read only by flatten(-2): (x, cos, sin) of the
    interleaved op, or None."""
    product = real.args[0]
    if not (calls(product, aten.mul.Tensor) and len(product.args) == 2 and all(isinstance(a, fx.Node) for a in product.args)):
        return None
    rank = val(real).dim()
    if not real.users or not all(_flattens_pairs(u, rank) for u in real.users):
        return None
    for turned, table in (product.args, product.args[::-1]):
        x = _pairs_of(turned.args[0]) if calls(turned, aten.view_as_complex.default) else None
        table_val = val(table)
        if x is None or table_val is None or table_val.dtype != torch.complex64 or not (
                _same_sizes(val(product).shape, val(turned).shape) and _same_sizes(table_val.shape[-1:], val(turned).shape[-1:])):
            continue  # the table must broadcast to x, as the op's cos and sin do, with one angle a pair
        parts = _parts(graph, table, memo)
        if parts is None:
            continue
        if (table, "repeated") not in memo:  # each value twice: the op's interleaved tables, one pair a table
            with graph.inserting_before(parts[-1].next):
                memo[table, "repeated"] = [graph.call_function(aten.repeat_interleave.self_int, (p, 2, -1)) for p in parts]
        return x, *memo[table, "repeated"]
    return None


@register_pass("complex_rotary")
def complex_rotary(gm: fx.GraphModule, ctx: BuildContext):
    graph, memo, lowered = gm.graph, {}, 0
    for real in find(gm, aten.view_as_real.default):
        match = _match(graph, real, memo)
        if match is None:
            continue
        with graph.inserting_before(real):
            rotated = graph.call_function(torch.ops.llmc.rotary_embedding.default, (*match, True))
        for flatten in list(real.users):
            flatten.replace_all_uses_with(rotated)
        lowered += 1
    graph.eliminate_dead_code()
    left = [n for n in graph.nodes if calls(n, COMPLEX_OPS) or _is_complex(n)]
    if left:
        raise PassError(f"{ctx.architecture}: computes with complex numbers ({left[0].name}: {left[0].target}) other "
                        "than RoPE's view_as_real(view_as_complex(x) * polar(1, angle)); llmc lowers only that")
    return gm, {"rotary_embeddings": lowered} if lowered else {}
