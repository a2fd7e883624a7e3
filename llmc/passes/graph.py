"""The pass toolkit: op sets, matching helpers, and node arguments by name.

Passes match patterns in the exported ATen graph. These helpers keep the matching readable:
`arg(node, "eps")` reads an argument through the op's schema (positional, keyword or default)
instead of `node.args[4]`, and `calls(node, OPS)` tests a node against a set of overloads. Shapes
are the manager's job (`propagate_shapes`, run after every pass): a pass creates nodes and never
sets `meta["val"]` itself.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten

# What torch.export leaves that no backend wants (canonicalize removes them).
ASSERTS = frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default})
# Dtype (and device) conversions.
CASTS = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default})

_MISSING = object()


def calls(node: Any, targets) -> bool:
    """Whether `node` is a call of `targets` (one op overload or a collection of them)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return node.target in targets if isinstance(targets, (set, frozenset, tuple, list)) else node.target == targets


def find(graph: fx.Graph | fx.GraphModule, targets) -> list[fx.Node]:
    """The calls of `targets` in graph order, as a list (safe to rewrite while iterating)."""
    graph = graph.graph if isinstance(graph, fx.GraphModule) else graph
    return [n for n in graph.nodes if calls(n, targets)]


def only_user(node: fx.Node, targets) -> fx.Node | None:
    """`node`'s single user if it calls `targets`, else None."""
    users = list(node.users)
    return users[0] if len(users) == 1 and calls(users[0], targets) else None


def is_weight(node: Any) -> bool:
    """A get_attr: a weight or buffer of the module (constant at run time)."""
    return isinstance(node, fx.Node) and node.op == "get_attr"


def val(node: Any) -> torch.Tensor | None:
    """The (fake) tensor `node` computes; None for non-tensor values. A node this pass created has none until
    the manager propagates shapes after the pass: it is inferred here from its inputs' values, on demand."""
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def value(node: Any) -> Any:
    """`node`'s `meta["val"]` (a fake tensor, a tuple of them, a SymInt...), inferred if missing; None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    if "val" not in node.meta and node.op in ("call_function", "get_attr"):
        inferred = _infer(node)
        if inferred is not None:
            node.meta["val"] = inferred
    return node.meta.get("val")


def _infer(node: fx.Node) -> Any:
    from torch._guards import detect_fake_mode

    if node.op == "get_attr":
        weight = node.graph.owning_module.get_buffer(node.target)
        mode = detect_fake_mode([n.meta.get("val") for n in node.graph.nodes if n.op == "placeholder"])
        return None if mode is None else mode.from_tensor(weight, static_shapes=True)
    inputs = [value(n) for n in node.all_input_nodes]
    mode = detect_fake_mode(inputs)
    if mode is None or any(v is None for v in inputs):
        return None
    with mode:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: on_cpu(n.meta["val"]))
        try:
            return node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001  unknown here; the manager's propagation after the pass reports it
            return None


def on_cpu(v: Any) -> Any:
    """The graph was traced on the meta device and its weights are on the CPU: values meet on the CPU."""
    if isinstance(v, (tuple, list)):
        return type(v)(on_cpu(x) for x in v)
    if isinstance(v, torch.Tensor) and v.device.type == "meta":
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu")
    return v


def arg(node: fx.Node, name: str, default: Any = _MISSING) -> Any:
    """The argument `name` of an op call, wherever the call put it: positional, keyword, or the schema's default."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        raise TypeError(f"{node.name}: {node.target} has no schema; read its args directly")
    for i, a in enumerate(schema.arguments):
        if a.name != name:
            continue
        if i < len(node.args) and not a.kwarg_only:
            return node.args[i]
        if name in node.kwargs:
            return node.kwargs[name]
        if a.has_default_value():
            return a.default_value
        if default is not _MISSING:
            return default
        raise KeyError(f"{node.name}: {node.target} was called without its argument {name!r}")
    raise KeyError(f"{node.target} has no argument {name!r} (its schema: {schema})")


def set_arg(node: fx.Node, name: str, new: Any) -> None:
    """Set the argument `name` of an op call where the call put it, or as a keyword if it left it out."""
    schema = node.target._schema
    i = next(i for i, a in enumerate(schema.arguments) if a.name == name)
    if i < len(node.args) and not schema.arguments[i].kwarg_only:
        node.update_arg(i, new)
    else:
        node.update_kwarg(name, new)


def tensor_args(node: fx.Node) -> Iterable[fx.Node]:
    """The nodes among `node`'s positional arguments."""
    return (a for a in node.args if isinstance(a, fx.Node))


def replace(node: fx.Node, new: fx.Node) -> None:
    """`new` takes `node`'s place for all its users (the manager removes `node` once it is dead)."""
    node.replace_all_uses_with(new)
