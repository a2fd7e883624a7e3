"""llmc::linear: y = x W^T + b, the op every linear layer becomes, and llmc::prepacked_linear, what it
runs as on CPU.

Engines store W as [N, K], the layout every backend and pass reads. When the torch backend loads a
rank onto a CPU where llmc's kernel library has this kernel, `prepack_linears` rewrites each llmc::linear into
llmc::prepacked_linear with W reordered once into column blocks of 16 output features (the layout
of csrc/linear.cpp; oneDNN and IPEX prepack weights the same way). That one kernel serves decode,
where it streams W at the memory's speed for 1 to 8+ rows alike, and prefill, where it keeps up
with torch's GEMM (docs/performance-history.md has the measurements).

The references are torch's linear, on the unpacked weight for the prepacked op.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from llmc.plugins import cpu_kernels
from llmc.plugins.cpu_kernels import PREPACKED, register_prepacked
from llmc.weights import set_weight

BLOCK = 16  # output features per block: one AVX-512 vector of fp32

torch.library.define("llmc::linear", "(Tensor x, Tensor w, Tensor? bias) -> Tensor")
cpu_kernels.reference("llmc::linear", F.linear)
torch.library.register_fake("llmc::linear", lambda x, w, bias: x.new_empty((*x.shape[:-1], w.shape[0])))

torch.library.define("llmc::prepacked_linear", "(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor")


def column_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[N, K] -> [N/block, K, block], N padded with zero outputs: block[k][j] = w[block * b + j][k]."""
    raw = w.view(torch.uint8) if w.element_size() == 1 else w  # torch pads no float8 tensor
    raw = F.pad(raw, (0, 0, 0, -raw.shape[0] % block))
    return raw.view(-1, block, raw.shape[1]).transpose(1, 2).contiguous().view(w.dtype)


def from_column_blocks(w: torch.Tensor, out_features: int) -> torch.Tensor:
    """The inverse of column_blocks: [N, K]."""
    return w.transpose(1, 2).flatten(0, 1)[:out_features]


def prepack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """[N, K] -> fp32 [N/16, K, 16] or bf16 [N/16, K/2, 16, 2] (N padded to 16, bf16's K to even, with zeros);
    None for other dtypes (no kernel)."""
    if w.dtype == torch.float32:
        return column_blocks(w, BLOCK)
    if w.dtype != torch.bfloat16:
        return None
    pairs = column_blocks(F.pad(w, (0, w.shape[1] % 2)), BLOCK)  # [N/16, K, 16]
    return pairs.view(pairs.shape[0], -1, 2, BLOCK).transpose(2, 3).contiguous()


def unpack_weight(w: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of prepack_weight: [N, K]."""
    if w.dim() == 4:  # bf16 pairs
        w = w.transpose(2, 3).flatten(1, 2)
    return from_column_blocks(w, out_features)[:, :in_features]


def prepacked_linear(x, w, bias, out_features):
    return F.linear(x, unpack_weight(w, out_features, x.shape[-1]).to(x.dtype), bias)


cpu_kernels.reference("llmc::prepacked_linear", prepacked_linear)
torch.library.register_fake(
    "llmc::prepacked_linear", lambda x, w, bias, out_features: x.new_empty((*x.shape[:-1], out_features))
)

register_prepacked(torch.ops.llmc.linear.default, torch.ops.llmc.prepacked_linear.default, {1: prepack_weight})


def prepack_linears(gm: fx.GraphModule) -> int:
    """Rewrite every linear op of PREPACKED whose prepacked op has a C++ kernel on this CPU, and whose weights a kernel
    takes, into its prepacked op; returns how many. Its out_features is the rows (dim -2) of its first prepacked weight
    (an MoE's gate_up: [experts, rows, K]).

    A weight only such ops read, at the same argument, is replaced by its prepacked form; one that something else
    reads too (an LM head tied to the embedding) gets a prepacked copy beside it.
    """
    packed = {}  # (weight name, packer) -> (get_attr of its prepacked form, or None: no kernel; its rows)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in PREPACKED:
            continue
        prepacked_op, packers = PREPACKED[node.target]
        if not cpu_kernels.has_kernel(prepacked_op) or any(node.args[i].op != "get_attr" for i in packers):
            continue
        for i, pack in packers.items():
            if (node.args[i].target, pack) not in packed:
                packed[node.args[i].target, pack] = _prepack(gm, node.args[i], i, pack)
        new = {i: packed[node.args[i].target, pack] for i, pack in packers.items()}
        if any(attr is None for attr, _ in new.values()):
            continue
        args = [new[i][0] if i in new else arg for i, arg in enumerate(_positional(node))]
        node.target, node.args, node.kwargs = prepacked_op, (*args, new[min(new)][1]), {}
        count += 1
    gm.recompile()
    return count


def _positional(node: fx.Node) -> list:
    """node's arguments all positional, those it leaves out at their defaults: out_features follows them."""
    rest = node.target._schema.arguments[len(node.args):]
    return [*node.args, *(node.kwargs.get(a.name, a.default_value) for a in rest)]


def _prepack(gm: fx.GraphModule, weight: fx.Node, index: int, pack):
    tensor = gm.get_buffer(weight.target)
    prepacked = pack(tensor)
    if prepacked is None:
        return None, None
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == weight.target]  # a graph may have several
    if all(user.target in PREPACKED and PREPACKED[user.target][1].get(index) is pack and user.args[index] is reader
           for reader in readers for user in reader.users):
        set_weight(gm, weight.target, prepacked)
        return weight, tensor.shape[-2]
    set_weight(gm, weight.target + "_prepacked", prepacked)
    with gm.graph.inserting_after(weight):
        return gm.graph.get_attr(weight.target + "_prepacked"), tensor.shape[-2]
