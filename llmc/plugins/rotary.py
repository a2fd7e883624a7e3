"""llmc::rotary_embedding: rotary position embedding (RoPE) of queries or keys: x * cos + rotate(x) * sin,
with cos and sin broadcast to x. Two ways of pairing x's channels, as HF writes them:

- rotate-half (Llama, Mistral, Qwen2, GPT-NeoX, whose partial rotary slices x before it): channel i
  turns with i + d/2, rotate(x) = cat(-x[..., d/2:], x[..., :d/2]);
- interleaved (GPT-J's rotate_every_two, vLLM's is_neox_style=False): channel 2i turns with 2i + 1,
  rotate(x) = stack(-x[..., 1::2], x[..., ::2]).flatten(-2), and cos / sin repeat each value twice.

The reference is those torch ops, in that order; on CPU a C++ kernel does it in one pass over x
(csrc/rotary.cpp) instead of six ops a tensor.
"""

from __future__ import annotations

import torch

from llmc.plugins import cpu_kernels

torch.library.define("llmc::rotary_embedding", "(Tensor x, Tensor cos, Tensor sin, bool interleaved=False) -> Tensor")


def _rotate(x, interleaved):
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(x, cos, sin, interleaved=False):
    return x * cos + _rotate(x, interleaved) * sin


cpu_kernels.reference("llmc::rotary_embedding", rotary_embedding)
torch.library.register_fake("llmc::rotary_embedding", lambda x, cos, sin, interleaved=False: torch.empty_like(x))
