"""Paged attention: the one op through which every llmc program reads and writes its KV cache.

It implements docs/design.md's step contract for one layer. The step is a flat, ragged batch of T new
tokens from S sequences; sequence i owns the tokens query_start_loc[i]:query_start_loc[i+1] and has
seq_lens[i] tokens of context once they are added. The op first writes the new keys and values into
the cache at `slot_mapping` (slot = block * block_size + offset), then lets each new token attend to
its sequence's context through the sequence's block table, causally (and within `sliding_window`
tokens when that is positive).

An FP8 KV cache (kv_cache of dtype float8_e4m3fn) stores k / k_scale and v / v_scale (per-layer
scalars from calibration, saturating at 448) and multiplies them back on read.

Attention features, each as transformers' eager attention computes it (llmc/frontend/attention_interface.py):
`softcap` > 0 caps each scaled logit x at softcap * tanh(x / softcap); `alibi_slopes` [num_heads] then add
slope * (key position - query position); `sinks` [num_heads] are one more logit per head in every softmax,
whose probability is dropped (GPT-OSS). K and V may have different head dims (MLA): the cache's last dim is
the larger one, the other zero-padded, and the output has V's.

With `cos` and `sin` ([T, rotary_dim], one row per new token), RoPE is folded in (TensorRT-LLM's
attention plugin does the same): q and k arrive unrotated and the op applies llmc::rotary_embedding
to their first rotary_dim channels (`rotary_interleaved` as that op's `interleaved`) before
anything else, so the cache holds rotated keys as before.

Layouts (those of the HF attention it replaces, so the graph around it is unchanged):
    q       [1, num_heads, T, dk]
    k, v    [1, num_kv_heads, T, dk], [1, num_kv_heads, T, dv]     (before any GQA expansion)
    kv_cache[num_layers, 2, num_blocks, block_size, num_kv_heads, max(dk, dv)]
    returns [1, num_heads, T, dv]

`paged_attention` below is the reference: plain torch, the definition of the op's numerics, and
what runs on devices without a kernel. On CPU a C++ kernel (csrc/paged_attention.cpp) runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmc.plugins import cpu_kernels, rotary


# Defined with torch.library's schema API rather than @custom_op: the same op for FX and export,
# without custom_op's per-call Python wrapping (about 80 us a call, measured; it adds up per layer).
torch.library.define(
    "llmc::paged_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, int layer, Tensor slot_mapping, Tensor block_tables, "
    "Tensor seq_lens, Tensor query_start_loc, float scale, int sliding_window, Tensor? k_scale=None, "
    "Tensor? v_scale=None, Tensor? cos=None, Tensor? sin=None, bool rotary_interleaved=False, Tensor? alibi_slopes=None, "
    "float softcap=0.0, Tensor? sinks=None) -> Tensor",
)


def apply_rope(x, cos, sin, interleaved):
    """x [1, heads, T, head_dim] with RoPE on its first rotary_dim channels."""
    dim = cos.shape[-1]
    cos, sin = cos.view(1, 1, -1, dim), sin.view(1, 1, -1, dim)
    if dim == x.shape[-1]:
        return rotary.rotary_embedding(x, cos, sin, interleaved)
    return torch.cat((rotary.rotary_embedding(x[..., :dim], cos, sin, interleaved), x[..., dim:]), dim=-1)


def paged_attention(q, k, v, kv_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                    k_scale=None, v_scale=None, cos=None, sin=None, rotary_interleaved=False, alibi_slopes=None, softcap=0.0,
                    sinks=None):
    if cos is not None:
        q, k = apply_rope(q, cos, sin, rotary_interleaved), apply_rope(k, cos, sin, rotary_interleaved)
    write_kv_cache(k, v, kv_cache, layer, slot_mapping, k_scale, v_scale)
    return paged_attention_reference(
        q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, sliding_window, k_scale, v_scale,
        v.shape[-1], alibi_slopes, softcap, sinks,
    )


def paged_attention_fake(q, k, v, kv_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                         k_scale=None, v_scale=None, cos=None, sin=None, rotary_interleaved=False, alibi_slopes=None,
                         softcap=0.0, sinks=None):
    return attention_output(q, v.shape[-1])


def attention_output(q, head_dim=None):
    """The op's output, like q (with V's head dim): [1, heads, T, head_dim] as a view of [1, T, heads, head_dim]
    memory, what HF's transpose(1, 2) after attention expects (and the layout of every implementation's result)."""
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], head_dim or q.shape[3])).transpose(1, 2)


cpu_kernels.reference("llmc::paged_attention", paged_attention)
torch.library.register_fake("llmc::paged_attention", paged_attention_fake)


def write_kv_cache(k, v, kv_cache, layer, slot_mapping, k_scale=None, v_scale=None) -> None:
    _, _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    slots = num_blocks * block_size
    for i, (x, x_scale) in enumerate(((k, k_scale), (v, v_scale))):
        x = x[0].transpose(0, 1)
        if x_scale is not None:  # FP8: torch's cast rounds to nearest even and saturates at 448
            x = x.float() / x_scale
        x = F.pad(x, (0, head_dim - x.shape[-1]))  # K and V of different head dims: zero-padded to the cache's
        kv_cache[layer, i].view(slots, num_kv_heads, head_dim)[slot_mapping] = x.to(kv_cache.dtype)


def paged_attention_reference(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                              k_scale=None, v_scale=None, v_head_dim=None, alibi_slopes=None, softcap=0.0, sinks=None):
    """Attention of each sequence's new tokens over its cached context, one sequence at a time."""
    block_size, dk, dv = kv_cache.shape[3], q.shape[3], v_head_dim or q.shape[3]
    out = attention_output(q, dv)
    starts = query_start_loc.tolist()
    kv_scale = None if k_scale is None else torch.stack([k_scale, v_scale]).to(q.dtype).view(2, 1, 1, 1)
    for i, context_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[i, :num_blocks]
        # [2, num_blocks, block_size, kv_heads, d] -> [2, kv_heads, context_len, d]
        kv = kv_cache[layer][:, blocks].flatten(1, 2)[:, :context_len].transpose(1, 2).to(q.dtype)
        if kv_scale is not None:
            kv = kv * kv_scale
        if context_len == end - start and sliding_window <= 0:  # a whole prompt: plain causal (SDPA's flash path)
            mask = None
        else:
            query_pos = torch.arange(context_len - (end - start), context_len, device=q.device)[:, None]
            key_pos = torch.arange(context_len, device=q.device)[None, :]
            mask = key_pos <= query_pos
            if sliding_window > 0:
                mask &= key_pos > query_pos - sliding_window
        # 4-D inputs: SDPA sends 3-D ones to its slow math path on CPU (3x slower, measured).
        k, v = kv[0, :, :, :dk].unsqueeze(0), kv[1, :, :, :dv].unsqueeze(0)
        if alibi_slopes is None and not softcap and sinks is None:
            out[:, :, start:end] = F.scaled_dot_product_attention(
                q[:, :, start:end], k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
            )
        else:
            out[:, :, start:end] = _attention_math(q[:, :, start:end], k, v, context_len, scale, sliding_window,
                                                   alibi_slopes, softcap, sinks)
    return out


def _attention_math(q, k, v, context_len, scale, sliding_window, alibi_slopes, softcap, sinks):
    """The attention features SDPA lacks, spelled out in fp32 for one sequence: q [1, H, n, dk], k/v [1, Hkv, context, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query_pos = torch.arange(context_len - q.shape[2], context_len, device=q.device)[:, None]
    key_pos = torch.arange(context_len, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float().view(1, -1, 1, 1) * (key_pos - query_pos)
    allowed = key_pos <= query_pos
    if sliding_window > 0:
        allowed &= key_pos > query_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v.float()).to(q.dtype)
