"""ALiBi (Press et al.) recognised in an attention mask a model computes itself (Falcon with alibi=True).

Such a model adds a per-head linear bias over key positions to transformers' causal mask and passes the sum as
the attention's mask. The mask's subgraph is a function of the step's length alone (the bias grows from
`ones(T).cumsum()`, the slopes are constants), so the pass evaluates it, for several lengths, and accepts it only
when it equals, per head h, slope_h * (key - query) plus a per-row constant (which softmax ignores) where the
causal mask lets a key through, and masks the rest (at most half the dtype's lowest value). The slopes it found
become llmc::paged_attention's `alibi_slopes`, a weight of the graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from llmc.weights import set_weight

aten = torch.ops.aten
SIZE_OPS = {aten.sym_size.int, aten.size.default}
LENGTHS = (5, 13)  # two lengths: the slopes must not depend on it
# Bias entries may differ from exact lines by the rounding of the dtype the model computed them in (Falcon
# rounds slope * position to bfloat16: 2**-8 relative).
RELATIVE_TOLERANCE = 2**-7


def _ancestors(node: fx.Node) -> list[fx.Node] | None:
    """The nodes `node` is computed from, in graph order; None if it reads any input's values (not only its size)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a.op == "placeholder" and n.target not in SIZE_OPS:
                return None
            stack.append(a)
    return [n for n in node.graph.nodes if n in seen]


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], length: int) -> torch.Tensor:
    env = {}
    for n in nodes:
        if n.op == "placeholder":
            env[n] = torch.zeros((1, length), dtype=torch.long)
        elif n.op == "get_attr":
            env[n] = getattr(gm, n.target) if hasattr(gm, n.target) else gm.get_buffer(n.target)
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
        else:
            raise ValueError(n.op)
    return env[nodes[-1]]


def _slopes(bias: torch.Tensor) -> torch.Tensor | None:
    """Per-head slopes of a [heads, T, T] additive mask that is ALiBi over the causal mask, else None."""
    heads, length, _ = bias.shape
    pos = torch.arange(length)
    causal = pos[None, :] <= pos[:, None]
    lowest = torch.finfo(bias.dtype).min
    if not bool((bias[:, ~causal] <= lowest / 2).all()) or bool((bias[:, causal] <= lowest / 2).any()):
        return None
    last = bias[:, -1].double()  # the last query sees every key
    slopes = (last[:, -1] - last[:, 0]) / (length - 1)
    line = bias.double().diagonal(dim1=1, dim2=2)[:, :, None] + slopes[:, None, None] * (pos[None, :] - pos[:, None])
    error = (bias.double() - line)[:, causal].abs().max()
    scale = bias.double()[:, causal].abs().max().clamp_min(1e-6)
    return slopes.float() if error <= RELATIVE_TOLERANCE * scale else None


def alibi_slopes(gm: fx.GraphModule, mask: fx.Node) -> tuple[int, fx.Node] | None:
    """(0, a get_attr of the slopes) when `mask` is an ALiBi bias over the causal mask, else None."""
    nodes = _ancestors(mask)
    if nodes is None or not any(str(n.target) == "llmc_trace.causal_mask.default" for n in nodes):
        return None
    found = None
    for length in LENGTHS:
        try:
            bias = _evaluate(gm, nodes, length)
        except Exception:  # not a function of the length alone after all
            return None
        if not isinstance(bias, torch.Tensor) or bias.dtype == torch.bool or bias.dim() != 4 or bias.shape[0] != 1:
            return None
        bias = bias[0].expand(bias.shape[1], length, length)
        slopes = _slopes(bias)
        if slopes is None or (found is not None and not torch.allclose(slopes, found, rtol=RELATIVE_TOLERANCE)):
            return None
        found = slopes
    name = f"alibi_slopes_{mask.name}"
    if not hasattr(gm, name):
        set_weight(gm, name, found)
    with gm.graph.inserting_before(mask):
        node = gm.graph.get_attr(name)
    node.meta["val"] = found
    return 0, node
