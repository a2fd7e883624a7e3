"""A rank's graph as one generated Python function: the CPU analogue of a CUDA graph.

An `fx.GraphModule` runs its graph through generated code that looks every weight up through
`torch.nn.Module.__getattr__` (`getattr(self.model.layers, "3").mlp.down_proj.weight`: five
lookups, about 700 a step for a 12-layer Llama) and every op up through `torch.ops`, and calls each
op through `OpOverload.__call__`. `step_function` writes the same program as a plain function
whose weights, ops and constants are closure variables, bound once at load time:

    def step(input_ids, position_ids, ..., query_start_loc):
        embedding = llmc_fp8_embedding_default(model_embed_tokens_weight_fp8, ..., input_ids, float32)
        del input_ids
        ...

Each op is bound to what its call would run in the end: an aten op to its C++ entry point
(`OpOverload._op`, what `OpOverload.__call__` calls), or for the view ops a step calls dozens of
times to the Tensor method of the same op (torch's Python argument parser is quicker than the
OpOverload's). On CPU an llmc op with a C++ kernel is bound like an aten op (the dispatcher
reaches the kernel in C++); one without is bound to its Python reference (`llmc.plugins.CPU_FUNCTIONS`),
which skips a round trip from the dispatcher back into Python.
Values are deleted after their last use, as in fx's code, so a long prefill holds no more
activations than before.

torch.compile is not used: it compiles for long on first use and on each new shape, and its step
still reaches the llmc ops through the dispatcher (docs/performance-history.md has the measurements).
"""

from __future__ import annotations

import linecache
import math
import operator
from typing import Callable

import torch
import torch.fx as fx

from llmc.plugins import CPU_FUNCTIONS

_aten = torch.ops.aten
TENSOR_METHODS = {
    _aten.view.default: torch.Tensor.view,
    _aten.reshape.default: torch.Tensor.reshape,
    _aten.transpose.int: torch.Tensor.transpose,
    _aten.unsqueeze.default: torch.Tensor.unsqueeze,
    _aten.split_with_sizes.default: torch.Tensor.split_with_sizes,
    _aten.contiguous.default: torch.Tensor.contiguous,
    _aten.sym_size.int: torch.Tensor.size,
}


def step_function(gm: fx.GraphModule, device: torch.device | str = "cpu", name: str = "step") -> Callable:
    """`gm`'s graph as a function of its placeholders, in order; it returns what `gm` returns.

    The function's source is in `fn.__llmc_source__` (and in tracebacks). `name` tells ranks apart there.
    """
    direct = {**TENSOR_METHODS, **(CPU_FUNCTIONS if torch.device(device).type == "cpu" else {})}
    taken = {node.name for node in gm.graph.nodes}
    bound: dict[str, object] = {}  # closure variable -> value
    names: dict[object, str] = {}  # op, or (type, repr) of a constant -> its closure variable

    def bind(key, value, hint: str) -> str:
        if key not in names:
            var, i = hint, 0
            while var in taken:
                i += 1
                var = f"{hint}_{i}"
            taken.add(var)
            bound[var], names[key] = value, var
        return names[key]

    def source(a) -> str:
        if isinstance(a, fx.Node):
            return a.name
        if isinstance(a, list):
            return "[" + ", ".join(map(source, a)) + "]"
        if isinstance(a, tuple):
            return "(" + "".join(source(x) + ", " for x in a) + ")"
        if a is None or isinstance(a, (bool, int, str)) or (isinstance(a, float) and math.isfinite(a)):
            return repr(a)
        hint = str(a).removeprefix("torch.")  # dtypes, devices, inf and nan; slices are "const"
        return bind((type(a), repr(a)), a, hint if hint.isidentifier() else "const")

    def callee(target) -> str:
        if isinstance(target, torch._ops.OpOverload):
            fn = direct.get(target) or getattr(target, "_op", target)
            return bind(target, fn, f"{target.namespace}_{target._opname}_{target._overloadname}")
        return bind(target, target, target.__name__)  # operator.add and the like (graph_format's allow-list)

    last_user = {}  # value -> the node after which nothing reads it
    for node in reversed(gm.graph.nodes):
        for value in node.all_input_nodes:
            last_user.setdefault(value, node)
    dead_after: dict[fx.Node, list[str]] = {}
    for value, user in last_user.items():
        if value.op != "get_attr":  # weights live in the closure
            dead_after.setdefault(user, []).append(value.name)

    inputs, body = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif node.op == "get_attr":
            bound[node.name] = operator.attrgetter(node.target)(gm)
        elif node.op == "call_function":
            args = [source(a) for a in node.args] + [f"{k}={source(v)}" for k, v in node.kwargs.items()]
            if node.target is operator.getitem:
                body.append(f"{node.name} = {args[0]}[{args[1]}]")
            else:
                body.append(f"{node.name} = {callee(node.target)}({', '.join(args)})")
            dead = dead_after.get(node, []) + ([] if node.users else [node.name])
            if dead:
                body.append(f"del {', '.join(dead)}")
        elif node.op == "output":
            body.append(f"return {source(node.args[0])}")
        else:
            raise TypeError(f"node {node.name!r}: cannot generate a step for op {node.op!r}")

    while name in taken:  # the function's name must not hide a closure variable
        name += "_"
    filename = f"<llmc {name}>"
    code = (f"def make({', '.join(bound)}):\n    def {name}({', '.join(inputs)}):\n"
            + "".join(f"        {line}\n" for line in body) + f"    return {name}\n")
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(code, filename, "exec"), namespace)
    fn = namespace["make"](**bound)
    fn.__llmc_source__ = code
    return fn
