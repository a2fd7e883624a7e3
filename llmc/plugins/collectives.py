"""Tensor-parallel communication as graph ops (Megatron-LM's `tensor_parallel/mappings`).

    llmc::all_reduce(x)                 sum of x over the tensor-parallel group
    llmc::expert_all_reduce(x)          sum of x over the pipeline stage's tp x ep ranks (the parts of a
                                         MoE layer's output that each rank's experts computed)
    llmc::all_gather(x, full_size)      rank shards concatenated on the last dim, trimmed to full_size
    llmc::vocab_embedding(w, ids, start) this rank's rows [start, start + len(w)) of an embedding;
                                         ids outside them give zeros (summed over ranks by an all_reduce)

The groups are the process's own: the runtime sets them once per rank (`set_tensor_parallel_group`,
`set_expert_parallel_group`). Without one (a single rank, or a graph run at build time) the collectives are the identity, which
is exactly right at tp=1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmc.plugins import cpu_kernels

_group: dist.ProcessGroup | None = None
_stage_group: dist.ProcessGroup | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    global _group
    _group = group


def set_expert_parallel_group(group: dist.ProcessGroup | None) -> None:
    """The pipeline stage's tp x ep ranks."""
    global _stage_group
    _stage_group = group


def _world() -> int:
    return dist.get_world_size(_group) if _group is not None else 1


torch.library.define("llmc::all_reduce", "(Tensor x) -> Tensor")
torch.library.define("llmc::expert_all_reduce", "(Tensor x) -> Tensor")
torch.library.define("llmc::all_gather", "(Tensor x, int full_size) -> Tensor")
torch.library.define("llmc::vocab_embedding", "(Tensor weight, Tensor ids, int vocab_start) -> Tensor")


def all_reduce(x):
    out = x.clone()
    if _world() > 1:
        dist.all_reduce(out, group=_group)
    return out


def expert_all_reduce(x):
    out = x.clone()
    if _stage_group is not None and dist.get_world_size(_stage_group) > 1:
        dist.all_reduce(out, group=_stage_group)
    return out


def all_gather(x, full_size):
    if _world() > 1:
        parts = [torch.empty_like(x) for _ in range(_world())]
        dist.all_gather(parts, x.contiguous(), group=_group)
        x = torch.cat(parts, dim=-1)
    return x[..., :full_size].contiguous()


def vocab_embedding(weight, ids, vocab_start):
    local = ids - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    out = F.embedding(local.clamp(0, weight.shape[0] - 1), weight)
    return out * inside.unsqueeze(-1).to(out.dtype)


for name, fn in (("all_reduce", all_reduce), ("expert_all_reduce", expert_all_reduce), ("all_gather", all_gather), ("vocab_embedding", vocab_embedding)):
    cpu_kernels.reference(f"llmc::{name}", fn)
torch.library.register_fake("llmc::all_reduce", lambda x: torch.empty_like(x))
torch.library.register_fake("llmc::expert_all_reduce", lambda x: torch.empty_like(x))
torch.library.register_fake("llmc::all_gather", lambda x, full_size: x.new_empty((*x.shape[:-1], full_size)))
torch.library.register_fake(
    "llmc::vocab_embedding", lambda weight, ids, vocab_start: weight.new_empty((*ids.shape, weight.shape[1]))
)
