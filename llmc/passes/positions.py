"""Positions: a position table indexed by `arange(number of tokens)` reads the step's `position_ids` instead.

BART's family (BART, mBART, Marian, Pegasus, Blenderbot, PLBart, BigBird-Pegasus) computes its decoder's
positions as `arange(tokens) + cache length` and looks them up in a learned or sinusoidal table. Traced on one
sequence without a cache that is `arange(T)`: right for a lone prefill, wrong for a batch of sequences or a
decode step. The step's `position_ids` input holds each token's position in its own sequence, which is what
that expression computes in transformers. The pass rewrites an arange only where it proves that reading:
`arange(T)` over exactly the token count, int64, whose every use is an index into an embedding table (through
`+ constant`, unsqueeze, view, expand), or per-token arithmetic with numbers ending as a per-token factor of a
[1, T, heads, D] tensor (Llama 4's attention temperature on its layers without RoPE, computed from
`arange(T) + cache length`). Any other arange stays, and the engine refuses it (llmc/backends/allowed_ops.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from llmc.passes.graph import calls, find, only_user, val, value
from llmc.passes.manager import BuildContext, register_pass

aten = torch.ops.aten
ARANGES = {aten.arange.default, aten.arange.start}
# Ops between the arange and the table lookup that keep each token's index its own (an int constant added:
# the cache length, 0 when traced, and the table's offset).
INDEX_OPS = {aten.add.Tensor, aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default}


def _counts_tokens(node: fx.Node, tokens) -> bool:
    """`node` is arange(0, T) over the token count T, step 1, int64."""
    start, end = (0, node.args[0]) if node.target == aten.arange.default else node.args[:2]
    end_value, out = value(end), val(node)
    return start == 0 and _is_token_count(end_value, tokens) and out is not None and out.dtype == torch.int64


def _indexes_tables_only(node: fx.Node) -> bool:
    """Every use of `node` ends, through INDEX_OPS, as the indices of an embedding lookup."""
    for user in node.users:
        if calls(user, aten.embedding.default) and user.args[1] is node and user.args[0] is not node:
            continue
        if not (calls(user, INDEX_OPS) and user.args[0] is node and _indexes_tables_only(user)):
            return False
        if user.target == aten.add.Tensor and not isinstance(user.args[1], int):
            return False
    return bool(node.users)


# Per-token arithmetic with numbers: each token's value stays a function of its own position.
PER_TOKEN_MATH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.floor.default,
                  aten.log1p.default, aten.to.dtype}


def _scales_tokens_only(node: fx.Node, tokens) -> bool:
    """Every use of `node` ([T]) is per-token arithmetic with numbers ending as a [1, T, 1, 1] factor (through view
    and expand) of a [1, T, heads, D] tensor: Llama 4's attention temperature, a function of each query's position
    (`arange(T) + cache length`)."""
    for user in node.users:
        if calls(user, PER_TOKEN_MATH) and user.args[0] is node and all(isinstance(a, (int, float)) or a is torch.float32
                                                                          for a in user.args[1:]):
            if not _scales_tokens_only(user, tokens):
                return False
        elif calls(user, aten.view.default) and user.args[0] is node and _factor_only(user, tokens):
            continue
        else:
            return False
    return bool(node.users)


def _factor_only(view: fx.Node, tokens) -> bool:
    shape = val(view).shape
    if not (len(shape) == 4 and shape[0] == shape[2] == shape[3] == 1 and _is_token_count(shape[1], tokens)):
        return False
    for user in view.users:
        factor = user
        if calls(user, aten.expand.default):
            factor = only_user(user, aten.mul.Tensor)
        if not calls(factor, aten.mul.Tensor):
            return False
        other = next((a for a in factor.args if a is not user), None)
        other_shape = val(other).shape if val(other) is not None else ()
        if len(other_shape) != 4 or other_shape[0] != 1 or not _is_token_count(other_shape[1], tokens):
            return False
    return bool(view.users)


def _is_token_count(size, tokens) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr == tokens.node.expr


@register_pass("positions")
def positions(gm: fx.GraphModule, ctx: BuildContext):
    graph = gm.graph
    position_ids = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "position_ids"), None)
    if position_ids is None or val(position_ids) is None:
        return gm, {"positions": 0}
    tokens = val(position_ids).shape[1]
    rewritten = 0
    for node in find(graph, ARANGES):
        if not (isinstance(tokens, torch.SymInt) and _counts_tokens(node, tokens)
                and (_indexes_tables_only(node) or _scales_tokens_only(node, tokens))):
            continue
        with graph.inserting_before(node):
            per_token = graph.call_function(aten.select.int, (position_ids, 0, 0))
        node.replace_all_uses_with(per_token)
        graph.erase_node(node)
        rewritten += 1
    return gm, {"positions": rewritten}
