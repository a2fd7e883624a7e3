"""llmc::linear: y = x W^T + b, the op every linear layer becomes, and llmc::prepacked_linear, what it
runs as on CPU.

Engines store W as [N, K], the layout every backend and pass reads. When the torch backend loads a
rank onto a CPU with llmc's kernels, `prepack_linears` rewrites each llmc::linear into
llmc::prepacked_linear with W reordered once into column blocks of 16 output features (the layout
of csrc/linear.cpp; oneDNN and IPEX prepack weights the same way). That one kernel serves decode,
where it streams W at the memory's speed for 1 to 8+ rows alike, and prefill, where it is about as
fast as torch's GEMM (measured on the dev machine, 124.7M Llama's shapes: 27-32 GB/s for 1-8 rows
against 10-20 GB/s for a kernel on [N, K] rows; 190-220 GFLOP/s at 512 rows against F.linear's 165).

The references are torch's linear, on the unpacked weight for the prepacked op.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from llmc.plugins import cpu_kernels

BLOCK = 16  # output features per block: one AVX-512 vector of fp32

torch.library.define("llmc::linear", "(Tensor x, Tensor w, Tensor? bias) -> Tensor")
torch.library.impl("llmc::linear", "CompositeExplicitAutograd", F.linear)
torch.library.register_fake("llmc::linear", lambda x, w, bias: x.new_empty((*x.shape[:-1], w.shape[0])))

torch.library.define("llmc::prepacked_linear", "(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor")


def prepack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> fp32 [N/16, K, 16] or bf16 [N/16, K/2, 16, 2] (N padded to 16, bf16's K to even, with zeros)."""
    n, k = w.shape
    w = F.pad(w, (0, k % 2 if w.dtype == torch.bfloat16 else 0, 0, -n % BLOCK))
    blocks = w.view(-1, BLOCK, w.shape[1])  # [N/16, 16, K]
    if w.dtype == torch.bfloat16:
        return blocks.view(blocks.shape[0], BLOCK, -1, 2).permute(0, 2, 1, 3).contiguous()
    return blocks.transpose(1, 2).contiguous()


def unpack_weight(w: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The inverse of prepack_weight: [N, K]."""
    if w.dim() == 4:  # bf16 pairs
        w = w.permute(0, 2, 1, 3).flatten(2)
    else:
        w = w.transpose(1, 2)
    return w.flatten(0, 1)[:out_features, :in_features]


def prepacked_linear(x, w, bias, out_features):
    return F.linear(x, unpack_weight(w, out_features, x.shape[-1]).to(x.dtype), bias)


def prepacked_linear_cpu(x, w, bias, out_features):
    kernels = cpu_kernels.load()
    if kernels is None:
        return prepacked_linear(x, w, bias, out_features)
    return kernels.prepacked_linear(x, w, bias, out_features)


torch.library.impl("llmc::prepacked_linear", "CompositeExplicitAutograd", prepacked_linear)
torch.library.impl("llmc::prepacked_linear", "CPU", prepacked_linear_cpu)
torch.library.register_fake(
    "llmc::prepacked_linear", lambda x, w, bias, out_features: x.new_empty((*x.shape[:-1], out_features))
)

PREPACKABLE = (torch.float32, torch.bfloat16)


def prepack_linears(gm: fx.GraphModule) -> int:
    """Rewrite every llmc::linear on an fp32 or bf16 weight into llmc::prepacked_linear; returns how many.

    A weight only linears read is replaced by its prepacked form; one that something else reads too
    (an LM head tied to the embedding) gets a prepacked copy beside it.
    """
    linear, prepacked = torch.ops.llmc.linear.default, torch.ops.llmc.prepacked_linear.default
    done = {}  # weight name -> (get_attr of its prepacked form, out_features)
    for node in list(gm.graph.nodes):
        w = node.args[1] if node.target == linear else None
        if w is None or w.op != "get_attr":
            continue
        if w.target not in done:
            weight = gm.get_buffer(w.target)
            if weight.dtype not in PREPACKABLE or weight.dim() != 2:
                continue
            owner, _, attr = w.target.rpartition(".")
            if all(user.target == linear for user in w.users):
                gm.get_submodule(owner).register_buffer(attr, prepack_weight(weight))
                done[w.target] = w, weight.shape[0]
            else:
                gm.get_submodule(owner).register_buffer(attr + "_prepacked", prepack_weight(weight))
                with gm.graph.inserting_after(w):
                    done[w.target] = gm.graph.get_attr(w.target + "_prepacked"), weight.shape[0]
        packed, out_features = done[w.target]
        x, _, bias = node.args
        node.target, node.args = prepacked, (x, packed, bias, out_features)
    gm.recompile()
    return sum(node.target == prepacked for node in gm.graph.nodes)
