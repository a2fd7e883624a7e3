"""Pipeline parallel: keep pipeline stage `ctx.pp_rank`'s contiguous range of layers.

Layer i begins at the norm before its attention (found from the graph: the input of the projection
that feeds attention i's query). Stages cut the graph there: a stage computes the activations (the
nodes that depend on input_ids) of its layers; what it needs from earlier stages arrives as inputs
`stage_input_k`, and what later stages need leaves as its outputs: the hidden state, and the
residual where the add joined the next norm. Values computed from positions alone (RoPE tables)
are recomputed by every stage that uses them rather than sent. The first stage holds the embedding,
the last the final norm and LM head; layers go to stages balanced by parameter count, or as
`ctx.pp_layers` says.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, PassError, register_pass

aten = torch.ops.aten
ATTENTION = torch.ops.llmc.paged_attention.default
LINEAR = torch.ops.llmc.linear.default
# A pre-quantized checkpoint's linears are quantized from the start (llmc/frontend/prequantized.py).
LINEARS = (LINEAR, torch.ops.llmc.fp8_linear.default, torch.ops.llmc.fp8_dynamic_linear.default, torch.ops.llmc.nvfp4_linear.default)
# The norms a layer can begin with (fused with the residual add or not).
NORMS = (torch.ops.llmc.rms_norm.default, torch.ops.llmc.add_rms_norm.default, torch.ops.llmc.add_layer_norm.default,
         aten.layer_norm.default)
STEP = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, operator.getitem)


def _first_linear_before(node: fx.Node) -> fx.Node:
    """The linear that the query of an attention comes from (through reshapes, RoPE, per-head norms)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.target in LINEARS:
            return n
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a not in seen and a.op == "call_function")
    raise PassError(f"no projection found before attention {node.name}")


def layer_starts(graph: fx.Graph) -> list[fx.Node]:
    """For each layer, the node it begins with: the norm (or else the value) its query projection reads."""
    starts = []
    for attention in (n for n in graph.nodes if n.target == ATTENTION):
        x = read = _first_linear_before(attention.args[0]).args[0]
        while x.target not in NORMS and x.target in STEP:
            x = x.args[0]
        starts.append(x if x.target in NORMS else read)
    return starts


def activations(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on the values of input_ids: what a stage computes or receives, never recomputes.
    (The number of tokens, `sym_size(input_ids)`, is not one: every stage gets input_ids.)"""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if (n.op == "placeholder" and n.target == "input_ids") or (
            n.target != aten.sym_size.int and any(a in out for a in n.all_input_nodes)
        ):
            out.add(n)
    return out


def balance(costs: list[int], stages: int) -> list[int]:
    """Contiguous layer counts per stage that minimise the largest stage's cost."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[k][i]: first i layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    counts, i = [], n
    for k in range(stages, 0, -1):
        counts.append(i - cut[k][i])
        i = cut[k][i]
    return counts[::-1]


def _spec(node: fx.Node) -> dict:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PassError(f"pipeline_parallel: {node.name} crosses a stage boundary but has no traced tensor shape")
    return {"shape": [d if isinstance(d, int) else -1 for d in val.shape], "dtype": str(val.dtype).removeprefix("torch.")}


@register_pass("pipeline_parallel", sharding=True)
def pipeline_parallel(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.pp_size == 1:
        return gm, {}
    graph = gm.graph
    starts = layer_starts(graph)
    num_layers = len(starts)
    if ctx.pp_size > num_layers:
        raise PassError(f"pp={ctx.pp_size} exceeds the model's {num_layers} layers; pp can be 1 to {num_layers}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    # A getitem lives with the node it unpacks, so no stage ever sends a tuple.
    position = {n: order[n.args[0]] if n.target == operator.getitem else order[n] for n in graph.nodes}
    acts = activations(graph)

    bounds = [order[s] for s in starts] + [len(order)]
    bounds[0] = 0  # the embedding belongs to the first layer's stage, the final norm and LM head to the last's
    layer_of = lambda n: max(i for i in range(num_layers) if bounds[i] <= position[n])  # noqa: E731
    if ctx.pp_layers is None:
        costs = [0] * num_layers
        for n in graph.nodes:
            if n in acts:
                for a in n.all_input_nodes:
                    if a.op == "get_attr":
                        costs[layer_of(n)] += gm.get_buffer(a.target).numel()
        counts = balance(costs, ctx.pp_size)
    else:
        counts = list(ctx.pp_layers)
        if len(counts) != ctx.pp_size or sum(counts) != num_layers or min(counts) < 1:
            raise PassError(
                f"pp_layers {counts} must give each of the {ctx.pp_size} stages at least one layer, "
                f"{num_layers} layers in all"
            )
    first_layers = [sum(counts[:s]) for s in range(ctx.pp_size)]
    cuts = [bounds[first] for first in first_layers[1:]]
    stage_of = lambda n: sum(position[n] >= c for c in cuts)  # noqa: E731

    # crossing[s]: activations of stages <= s that a later stage (or the output) uses, in graph order.
    out_node = next(n for n in graph.nodes if n.op == "output")
    crossing: list[list[fx.Node]] = []
    for s in range(ctx.pp_size - 1):
        crossing.append([
            n for n in graph.nodes
            if n in acts and stage_of(n) <= s and any(u is out_node or stage_of(u) > s for u in n.users)
        ])

    stage = ctx.pp_rank
    first, last = first_layers[stage], first_layers[stage] + counts[stage]
    received = crossing[stage - 1] if stage > 0 else []
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = new.placeholder(n.target)
            env[n].meta = dict(n.meta)
    for i, n in enumerate(received):
        env[n] = new.placeholder(f"stage_input_{i}")
        env[n].meta = {"val": n.meta.get("val")}

    def copy(n: fx.Node) -> fx.Node:
        if n not in env:  # not an activation of an earlier stage: a weight or a positions-only value
            for a in n.all_input_nodes:
                copy(a)
            env[n] = new.node_copy(n, lambda a: env[a])
        return env[n]

    for n in graph.nodes:
        if n in acts and n not in env and stage_of(n) == stage and n.op != "output":
            for a in n.all_input_nodes:
                copy(a)
            env[n] = new.node_copy(n, lambda a: env[a])
            if n.target == ATTENTION:
                env[n].update_arg(4, n.args[4] - first)
    sent = crossing[stage] if stage < ctx.pp_size - 1 else None
    if sent is None:
        new.output(fx.node.map_arg(out_node.args[0], lambda a: env[a]))
    else:
        new.output(tuple(env[n] for n in sent))
    # Placeholders a stage does not read are left out of its program (the runtime passes what it names).
    for n in list(new.nodes):
        if n.op == "placeholder" and not n.users and not n.target.startswith("stage_input_"):
            new.erase_node(n)

    ctx.kv_cache = {**ctx.kv_cache, "num_layers": last - first}
    ctx.pp_inputs = [{"name": f"stage_input_{i}", **_spec(n)} for i, n in enumerate(received)]
    ctx.pp_outputs = [_spec(n) for n in sent] if sent is not None else []
    return fx.GraphModule(gm, new), {"layers": [first, last], "layers_per_stage": counts, "receives": len(received),
                                      "sends": len(sent or [])}
