"""A safe, human-readable JSON format for aten-level ``torch.fx.Graph`` programs.

An engine is stored as this JSON (the program) plus safetensors (the weights).
Why not ``torch.save`` / ``torch.export.save``: those go through pickle, so
loading an engine could run arbitrary code.  Here loading only ever builds
nodes whose targets are in an allow-list: by default ``allowed_ops.PROGRAM_OPS``,
exactly the op overloads llmc's passes emit (never a namespace: ``aten`` alone
has ops that read and write files, such as ``aten.from_file``).  Constants are
plain JSON values or tagged objects (``{"dtype": "float32"}``) that are checked
against fixed tables.
Being one JSON object per node, a program can also be diffed and reviewed.

    {"format": "llmc.fx/1",
     "nodes": [{"op": ..., "name": ..., "target": ..., "args": [...], "kwargs": {...}}]}

Node names are kept, so ``get_attr`` targets still match the safetensors keys.
Node ``meta`` is not stored.
"""

from __future__ import annotations

import keyword
import math
import operator
import re

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from llmc.backends.allowed_ops import IN_PLACE_OPS, PROGRAM_OPS, SIZED_OPS, VIEW_OPS

FORMAT = "llmc.fx/1"
_OPS = ("placeholder", "get_attr", "call_function", "output")
_NAMESPACES = ("aten", "prims", "llmc")
# The only non-OpOverload targets in graphs torch.export makes from HF models
# are operator.getitem; the arithmetic/comparisons are what symbolic shape math emits.
_PY_FUNCS = {f"operator.{n}": getattr(operator, n) for n in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
    "eq", "ne", "lt", "le", "gt", "ge")}
_PY_NAMES = {fn: name for name, fn in _PY_FUNCS.items()}
# The allowed ops' arguments that size an allocation rather than index into one (a program's other sizes are
# its inputs' and weights'), allowed_ops.SIZED_OPS: bounded, so that no constant asks for petabytes.
MAX_REPEATS = 1024
MAX_SIZE = 1 << 20
MAX_ELEMENTS = 1 << 28
_BOUNDS = {"repeats": MAX_REPEATS, "output_size": MAX_REPEATS}
# expand's -1 keeps a dimension as it is.
_LOWEST = {("aten.expand.default", "size"): -1}
# What an op's result may share memory with its first argument through (a view, or the argument itself).
_MAY_ALIAS = VIEW_OPS | IN_PLACE_OPS | {"operator.getitem", "aten.expand.default", "aten.contiguous.default",
                                        "aten.to.dtype", "aten.type_as.default"}


def _table(kind: type) -> dict:
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


_KINDS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}
_TAGGED = {tag: _table(kind) for tag, kind in _KINDS.items()}
# fx pastes placeholder/get_attr targets and kwarg names into the Python source it
# generates and exec()s, so on load they must be plain names, never code.
_ATTR_PATH = re.compile(r"(?!__)\w+(\.(?!__)\w+)*", re.ASCII)


def _ident(s) -> bool:
    return isinstance(s, str) and s.isascii() and s.isidentifier() and not keyword.iskeyword(s)


class GraphFormatError(ValueError):
    """The graph can't be written in, or the JSON can't be read as, llmc.fx/1."""


def _rebuild_msg(what: str) -> str:
    return (f"{what}: this engine was built by an incompatible llmc/torch version "
            f"(torch {torch.__version__} here); rebuild the engine")


def _enc(v, node):
    if isinstance(v, torch.fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": str(v)}  # 'inf', '-inf', 'nan'
    if isinstance(v, list):
        return [_enc(x, node) for x in v]
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, node) for x in v]}
    if isinstance(v, slice):
        return {"slice": [_enc(x, node) for x in (v.start, v.stop, v.step)]}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    for tag, kind in _KINDS.items():
        if isinstance(v, kind):
            return {tag: str(v).removeprefix("torch.")}
    raise GraphFormatError(f"node {node.name!r}: cannot encode value of type {type(v).__qualname__}")


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if node.op != "call_function":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    if t in _PY_NAMES:
        return _PY_NAMES[t]
    raise GraphFormatError(f"node {node.name!r}: call target {t!r} is not an OpOverload "
                           f"or an allow-listed operator function")


def graph_to_json(graph: torch.fx.Graph) -> dict:
    """Encode every node: placeholder, get_attr, call_function, output."""
    nodes = []
    for n in graph.nodes:
        if n.op not in _OPS:
            raise GraphFormatError(f"node {n.name!r}: op {n.op!r} is not supported")
        nodes.append({"op": n.op, "name": n.name, "target": _target_name(n),
                      "args": [_enc(a, n) for a in n.args],
                      "kwargs": {k: _enc(v, n) for k, v in n.kwargs.items()}})
    return {"format": FORMAT, "nodes": nodes}


def _resolve(name: str, where: str, allowed: frozenset[str]):
    if name not in allowed:
        raise GraphFormatError(f"{where}: call target {name!r} is not allowed (a program calls only the ops llmc's "
                               "passes emit, llmc/backends/allowed_ops.py); rebuild the engine with this llmc")
    if name in _PY_FUNCS:
        return _PY_FUNCS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in _NAMESPACES:
        raise GraphFormatError(_rebuild_msg(f"{where}: call target {name!r} is not an op"))
    try:
        op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        op = None
    if not isinstance(op, torch._ops.OpOverload):
        raise GraphFormatError(_rebuild_msg(f"{where}: unknown op {name!r}"))
    return op


def bind_arguments(op, args: tuple, kwargs: dict) -> dict | None:
    """The call's arguments by name, as the op's schema binds them; None where they do not bind."""
    try:
        bound = normalize_function(op, args, kwargs, normalize_to_only_use_kwargs=True)
    except (TypeError, RuntimeError, ValueError):
        return None
    return bound.kwargs if bound else None


def _check_sizes(op, name: str, args: tuple, kwargs: dict, where: str) -> None:
    """Each size argument's constants are in [lowest, bound] and a size list's constants multiply to at most
    MAX_ELEMENTS; a symbolic size must be the size of a tensor the program has (aten.sym_size.int)."""
    bound = bind_arguments(op, args, kwargs)
    if bound is None:
        raise GraphFormatError(where + f": arguments do not match {op._schema}")
    for arg in SIZED_OPS[name]:
        value = bound.get(arg)
        values = value if isinstance(value, (list, tuple)) else [value]
        lowest, highest = _LOWEST.get((name, arg), 0), _BOUNDS.get(arg, MAX_SIZE)
        elements = 1
        for v in values:
            if v is None and value is None:  # an optional size left out
                continue
            if isinstance(v, torch.fx.Node):
                if v.op != "call_function" or v.target is not torch.ops.aten.sym_size.int:
                    raise GraphFormatError(where + f": {arg} refers to {v.name!r}, which is not a tensor's size")
            elif isinstance(v, bool) or not isinstance(v, int) or not lowest <= v <= highest:
                raise GraphFormatError(where + f": {arg}={value} is out of range [{lowest}, {highest}]")
            else:
                elements *= max(v, 1)
        if elements > MAX_ELEMENTS:
            raise GraphFormatError(where + f": {arg}={value} asks for more than {MAX_ELEMENTS} elements")


def _check_in_place(op, name: str, args: tuple, kwargs: dict, where: str) -> None:
    """An in-place op writes only an intermediate: never a weight or an input, nor a view of one."""
    bound = bind_arguments(op, args, kwargs)
    if bound is None:
        raise GraphFormatError(where + f": arguments do not match {op._schema}")
    dest = bound.get("input")  # normalize_function names `self` so
    while isinstance(dest, torch.fx.Node) and dest.op == "call_function" and _target_name(dest) in _MAY_ALIAS:
        dest = dest.args[0] if dest.args else None
    if not isinstance(dest, torch.fx.Node) or dest.op != "call_function":
        raise GraphFormatError(where + f": {name} writes into {getattr(dest, 'name', dest)!r}, which is not an "
                               "intermediate result (in-place ops may not write weights or inputs)")


def _dec(v, nodes: dict, device: torch.device, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_dec(x, nodes, device, where) for x in v]
    if isinstance(v, dict) and len(v) == 1:
        (tag, x), = v.items()
        if tag == "node":
            if not isinstance(x, str) or x not in nodes:
                raise GraphFormatError(where + f": refers to unknown or later node {x!r}")
            return nodes[x]
        if tag == "tuple" and isinstance(x, list):
            return tuple(_dec(y, nodes, device, where) for y in x)
        if tag == "slice" and isinstance(x, list) and len(x) == 3:
            return slice(*(_dec(y, nodes, device, where) for y in x))
        if tag == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if tag == "device" and isinstance(x, str):
            return device
        if tag in _TAGGED:
            if isinstance(x, str) and x in _TAGGED[tag]:
                return _TAGGED[tag][x]
            raise GraphFormatError(_rebuild_msg(f"{where}: unknown torch {tag} {x!r}"))
    raise GraphFormatError(where + f": bad value {v!r}")


def graph_from_json(obj: dict, device: torch.device | str = "cpu", allowed: frozenset[str] = PROGRAM_OPS) -> torch.fx.Graph:
    """Rebuild the graph. Every torch.device constant found in args/kwargs is replaced by `device`
    (engines are built on one device and run on another). Only targets in `allowed` resolve
    ("aten.add.Tensor", "operator.getitem"; llmc's by default)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("nodes"), list):
        raise GraphFormatError(_rebuild_msg(f"not an {FORMAT} graph"))
    device = torch.device(device)
    graph, nodes = torch.fx.Graph(), {}
    for i, rec in enumerate(obj["nodes"]):
        where = f"node #{i} {rec.get('name')!r}" if isinstance(rec, dict) else f"node #{i}"
        if not (isinstance(rec, dict) and rec.get("op") in _OPS and isinstance(rec.get("name"), str)
                and isinstance(rec.get("target"), str) and isinstance(rec.get("args"), list)
                and isinstance(rec.get("kwargs"), dict)):
            raise GraphFormatError(where + ": malformed node record")
        if rec["name"] in nodes:
            raise GraphFormatError(where + ": duplicate node name")
        op, target = rec["op"], rec["target"]
        if op == "call_function":
            target = _resolve(target, where, allowed)
        elif not {"placeholder": _ident(target), "output": target == "output",
                  "get_attr": bool(_ATTR_PATH.fullmatch(target))}[op]:
            raise GraphFormatError(where + f": invalid {op} target {target!r}")
        if not all(_ident(k) for k in rec["kwargs"]):
            raise GraphFormatError(where + f": invalid keyword argument names {list(rec['kwargs'])}")
        args = tuple(_dec(a, nodes, device, where) for a in rec["args"])
        kwargs = {k: _dec(v, nodes, device, where) for k, v in rec["kwargs"].items()}
        if op == "call_function" and rec["target"] in SIZED_OPS:
            _check_sizes(target, rec["target"], args, kwargs, where)
        if op == "call_function" and rec["target"] in IN_PLACE_OPS:
            _check_in_place(target, rec["target"], args, kwargs, where)
        node = graph.create_node(op, target, args, kwargs, name=rec["name"])
        if node.name != rec["name"]:
            raise GraphFormatError(where + f": name is not a valid fx node name (became {node.name!r})")
        nodes[rec["name"]] = node
    try:
        graph.lint()
    except RuntimeError as e:
        raise GraphFormatError(f"invalid graph: {e}") from e
    return graph
