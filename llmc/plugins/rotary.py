"""llmc::rotary_embedding: rotary position embedding (RoPE) of queries or keys, in HF's rotate-half form:
x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin, with cos and sin broadcast to x (the form of Llama,
Mistral, Qwen2 and GPT-NeoX, whose partial rotary slices x before it).

The reference is those torch ops, in that order; on CPU a C++ kernel does it in one pass over x
(csrc/rotary.cpp) instead of six ops a tensor.
"""

from __future__ import annotations

import torch

from llmc.plugins import cpu_kernels

torch.library.define("llmc::rotary_embedding", "(Tensor x, Tensor cos, Tensor sin) -> Tensor")


def rotary_embedding(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotary_embedding_cpu(x, cos, sin):
    kernels = cpu_kernels.load()
    if kernels is None or x.dim() != 4 or x.shape[-1] % 2 or not x.dtype == cos.dtype == sin.dtype:
        return rotary_embedding(x, cos, sin)
    return kernels.rotary_embedding(x, cos, sin)


torch.library.impl("llmc::rotary_embedding", "CompositeExplicitAutograd", rotary_embedding)
torch.library.impl("llmc::rotary_embedding", "CPU", rotary_embedding_cpu)
torch.library.register_fake("llmc::rotary_embedding", lambda x, cos, sin: torch.empty_like(x))
