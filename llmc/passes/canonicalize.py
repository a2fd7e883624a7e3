"""Canonicalize: remove what torch.export leaves that no backend wants.

- runtime asserts on tensor metadata (they pin the traced device and block pattern matches),
- dtype/device conversions that convert nothing (`x.to(float32)` of an fp32 tensor),
- dropout in eval mode (`dropout(x, p, train=False)` is x),
- aliases (`x[..., :d]` of a last dim of d, as Phi-3 slices its whole head for RoPE) and empty tensors in a
  concatenation (its pass-through part `x[..., d:]`), so RoPE is found as on any other model,
- tensors computed from literals alone (Phi-3.5-MoE computes its RoPE frequencies `base ** (arange(0, d, 2) / d)`
  in every forward) are computed once and become weights, like other models' frequency buffers,
- `concat` is `cat` (the name the other passes match), and `expand_as(x, y)` is `expand(x, y's sizes)` (HRM's
  initial state, broadcast to the embeddings' shape),
- `squeeze()` of a tensor of static shape (ERNIE-MoE's router bias) becomes squeezes of its size-1 dims: the
  dim-less form stays refused where a dim is symbolic (a decode step's one token would be squeezed away),
- slices that cut a linear's output into consecutive parts (Phi-3's fused QKV `qkv[..., :q]`, `qkv[..., q:q + k]`,
  ...) become the one split the other passes know (tensor parallelism splits such sections),
- expert weights the model rearranges before llmc::moe (GPT-OSS's transposed, interleaved gate/up) are
  rearranged once, here, into weights the op reads directly (expert parallelism and quantization slice them).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, PassError, register_pass

import llmc.plugins.moe  # noqa: F401  (registers torch.ops.llmc.moe)
from llmc.passes.graph import ASSERTS, CASTS, arg, calls, find, set_arg, val
from llmc.weights import set_weight

aten = torch.ops.aten
MOE = torch.ops.llmc.moe.default


def _is_noop_conversion(node: fx.Node) -> bool:
    src, out = val(node.args[0]), val(node)
    if src is None or out is None:
        return False
    return src.dtype == out.dtype and "memory_format" not in node.kwargs


def _is_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and any(isinstance(d, int) and d == 0 for d in val.shape)


def _slices_to_splits(graph: fx.Graph) -> int:
    """Slices of a linear's output along one dim that tile it exactly, step 1 -> split_with_sizes; returns splits made."""
    groups: dict[tuple, list] = {}
    for node in graph.nodes:
        if not (node.target == aten.slice.Tensor and node.args[0].target == aten.linear.default
                and isinstance(node.args[0].meta.get("val"), torch.Tensor)):
            continue
        x = node.args[0]
        dim, lo, hi, step = (*node.args[1:], *(0, None, None, 1)[len(node.args) - 1:])
        size = x.meta["val"].shape[dim]
        if not (isinstance(size, int) and isinstance(lo, int) and step == 1):
            continue
        dim = dim % x.meta["val"].dim()
        groups.setdefault((x, dim), []).append((lo, min(size if hi is None else hi, size), node))
    made = 0
    for (x, dim), parts in groups.items():
        parts.sort(key=lambda p: p[:2])
        bounds = [p[:2] for p in parts]
        if len(parts) < 2 or bounds[0][0] != 0 or bounds[-1][1] != x.meta["val"].shape[dim] or any(
                a[1] != b[0] or a[0] >= a[1] for a, b in zip(bounds, bounds[1:] + [(bounds[-1][1], None)])):
            continue
        with graph.inserting_after(x):
            split = graph.call_function(aten.split_with_sizes.default, (x, [hi - lo for lo, hi, _ in parts], dim))
        split.meta["val"] = list(x.meta["val"].split([hi - lo for lo, hi, _ in parts], dim))
        for i, (_, _, node) in enumerate(parts):
            with graph.inserting_after(split):
                item = graph.call_function(operator.getitem, (split, i))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item)
            graph.erase_node(node)
        made += 1
    return made


def _static_squeeze(graph: fx.Graph, node: fx.Node) -> bool:
    """`squeeze(x)` of an x whose shape is all numbers -> squeeze(x, d) for each size-1 dim d, last first."""
    shape = getattr(val(node.args[0]), "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return False
    out = node.args[0]
    with graph.inserting_before(node):
        for d in reversed([d for d, size in enumerate(shape) if size == 1]):
            out = graph.call_function(aten.squeeze.dim, (out, d))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _expand_as(graph: fx.Graph, node: fx.Node) -> None:
    """`expand_as(x, other)` -> `expand(x, other's sizes)`: numbers, or `sym_size` of `other` where symbolic."""
    other = node.args[1]
    with graph.inserting_before(node):
        sizes = [d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (other, i))
                 for i, d in enumerate(val(other).shape)]
        node.replace_all_uses_with(graph.call_function(aten.expand.default, (node.args[0], sizes)))
    graph.erase_node(node)


def _is_pure(node: fx.Node) -> bool:
    """An ATen op that neither draws random numbers nor writes to its arguments."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
            and not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags)


def _fold_constants(gm: fx.GraphModule) -> int:
    """Each tensor computed by pure ops from literals alone, and used by other ops, becomes a weight; returns how many."""
    values: dict[fx.Node, object] = {}
    for node in gm.graph.nodes:
        literal_args = not any(isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool))
                               for a in torch.utils._pytree.tree_leaves((node.args, node.kwargs)))
        if _is_pure(node) and literal_args and all(n in values for n in node.all_input_nodes):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)
    folded = 0
    for node, v in values.items():
        if not isinstance(v, torch.Tensor) or all(u in values for u in node.users):
            continue
        if any(not _is_pure(u) for u in node.users):  # something writes to it: it stays the fresh tensor it is
            continue
        set_weight(gm, f"constant_{node.name}", v.contiguous())
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(f"constant_{node.name}"))
        folded += 1
    return folded


def _computed_from_weights(node: fx.Node) -> list[fx.Node] | None:
    """The subgraph computing `node` (inputs first) if it reads weights alone; None if it reads a step input."""
    order, seen = [], set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n.op not in ("get_attr", "call_function") or not all(visit(i) for i in n.all_input_nodes):
            return False
        order.append(n)
        return True

    return order if visit(node) else None


def _fold_expert_weights(gm: fx.GraphModule) -> int:
    """Each computed weight argument of llmc::moe becomes a weight; returns how many."""
    folded = 0
    for node in find(gm, MOE):
        for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
            w = arg(node, name)
            if not isinstance(w, fx.Node) or w.op == "get_attr":
                continue
            subgraph = _computed_from_weights(w)
            if subgraph is None:
                raise PassError(f"canonicalize: the {name} weights of {node.name} (llmc::moe) are computed from the step's inputs")
            values: dict[fx.Node, torch.Tensor] = {}
            for n in subgraph:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
                values[n] = gm.get_buffer(n.target) if n.op == "get_attr" else n.target(*args, **kwargs)
            source = next(n for n in subgraph if n.op == "get_attr").target
            set_weight(gm, f"{source}_rearranged", values[w].contiguous())
            with gm.graph.inserting_before(node):
                set_arg(node, name, gm.graph.get_attr(f"{source}_rearranged"))
            folded += 1
    return folded


@register_pass("canonicalize")
def canonicalize(gm: fx.GraphModule, ctx: BuildContext):
    asserts = conversions = dropouts = aliases = empties = squeezes = expands = 0
    for node in list(gm.graph.nodes):
        if calls(node, ASSERTS):
            gm.graph.erase_node(node)
            asserts += 1
        elif calls(node, CASTS) and _is_noop_conversion(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            conversions += 1
        elif calls(node, aten.dropout.default) and not arg(node, "train"):
            node.replace_all_uses_with(arg(node, "input"))
            gm.graph.erase_node(node)
            dropouts += 1
        elif node.target == aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            aliases += 1
        elif node.target == aten.concat.default:
            node.target = aten.cat.default
        elif node.target == aten.expand_as.default and val(node.args[1]) is not None:
            _expand_as(gm.graph, node)
            expands += 1
        elif node.target == aten.squeeze.default and _static_squeeze(gm.graph, node):
            squeezes += 1
        elif node.target == aten.cat.default and any(map(_is_empty, node.args[0])) and not _is_empty(node):
            kept = [x for x in node.args[0] if not _is_empty(x)]
            empties += len(node.args[0]) - len(kept)
            if len(kept) == 1:
                node.replace_all_uses_with(kept[0])
                gm.graph.erase_node(node)
            else:
                node.update_arg(0, kept)
    constants = _fold_constants(gm)
    splits = _slices_to_splits(gm.graph)
    expert_weights = _fold_expert_weights(gm)
    return gm, {"constants_folded": constants, "slices_to_splits": splits, "expert_weights_rearranged": expert_weights, "asserts_removed": asserts, "noop_conversions_removed": conversions, "eval_dropouts_removed": dropouts,
                "aliases_removed": aliases, "empty_concatenated_removed": empties, "static_squeezes": squeezes,
                "expand_as_to_expand": expands}
