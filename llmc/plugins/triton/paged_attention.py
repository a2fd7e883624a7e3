"""llmc::paged_attention on CUDA: one launch for a step's ragged batch of prefill chunks and decodes.

The op's contract and reference are llmc/plugins/attention.py. RoPE (when folded in) runs first (the rotary kernel
beside this one), then the new keys and values go into the cache (kv_cache_write.py), then this kernel reads the
cache through the block tables.

Grid: (sequence, query tile, KV head). A program takes BLOCK_Q of the sequence's new tokens times the GROUP query
heads that share one KV head (GQA), as the rows of one tile, so every K and V tile it loads serves the whole group.
It walks the sequence's context in tiles of BLOCK_N keys (each key's slot looked up in the block table, so any page
size works), from the sliding window's first key to its last query's position, with an online softmax in fp32.
Query tiles past a sequence's new tokens return at once: the grid is sized by the step's longest query, which the
caller may pass (`max_query_len`); by default the step's token count, which needs no device-to-host copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.attention import attention_output
from llmc.plugins.triton.common import dot, dot_precision, pow2, tanh
from llmc.plugins.triton.kv_cache_write import write_kv_cache
from llmc.plugins.triton.rotary import rotary_embedding


@triton.jit
def _paged_attention_kernel(
    q_ptr, kv_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, k_scale_ptr, v_scale_ptr,
    alibi_ptr, sinks_ptr, scale, softcap, sliding_window, page_size,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kv, stride_block, stride_slot, stride_head, stride_table,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P2: tl.constexpr, DV_P2: tl.constexpr,
    FP8: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq, tile, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_Q < q_len:
        context_len = tl.load(seq_lens_ptr + seq)
        rows = tl.arange(0, BLOCK_Q * GROUP_P2)
        token = tile * BLOCK_Q + rows // GROUP_P2  # index among the sequence's new tokens
        head = kv_head * GROUP + rows % GROUP_P2
        row_ok = (token < q_len) & (rows % GROUP_P2 < GROUP)
        q_pos = context_len - q_len + token  # the token's position in its sequence
        dk, dv = tl.arange(0, DK_P2), tl.arange(0, DV_P2)
        q_rows = q_ptr + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
        q = tl.load(q_rows + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK), other=0.0)

        if HAS_SINKS:  # the sink is one more logit: start the running max there, with its mass exp(0) = 1
            m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
            l_i = tl.where(row_ok, 1.0, 0.0)
        else:
            m_i = tl.full([BLOCK_Q * GROUP_P2], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_Q * GROUP_P2], tl.float32)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_Q * GROUP_P2, DV_P2], tl.float32)
        if FP8:  # the reference multiplies in q's dtype by the scales cast to it
            k_scale = tl.load(k_scale_ptr).to(q.dtype).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(q.dtype).to(tl.float32)

        first_pos = context_len - q_len + tile * BLOCK_Q
        end = tl.minimum(context_len, first_pos + BLOCK_Q)  # keys past the tile's last query are masked for all rows
        # the window's first key, rounded down to a tile (the whole context without a window)
        begin = tl.where(sliding_window > 0, tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N * BLOCK_N, 0)
        table = block_tables_ptr + seq * stride_table
        for key0 in range(begin, end, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            block = tl.load(table + keys // page_size, mask=key_ok, other=0).to(tl.int64)
            slot = kv_ptr + block * stride_block + (keys % page_size) * stride_slot + kv_head * stride_head
            k = tl.load(slot[None, :] + dk[:, None], mask=key_ok[None, :] & (dk[:, None] < DK), other=0.0)
            if FP8:
                k = (k.to(tl.float32).to(q.dtype).to(tl.float32) * k_scale).to(q.dtype)
            s = dot(q, k, PRECISION) * scale
            if HAS_SOFTCAP:
                s = softcap * tanh(s / softcap)
            if HAS_ALIBI:
                s += slope[:, None] * (keys[None, :] - q_pos[:, None]).to(tl.float32)
            allowed = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
            if sliding_window > 0:
                allowed &= keys[None, :] > q_pos[:, None] - sliding_window
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet: no NaN
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(slot[:, None] + stride_kv + dv[None, :], mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
            if FP8:
                v = (v.to(tl.float32).to(q.dtype).to(tl.float32) * v_scale).to(q.dtype)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_rows = out_ptr + (q_start + token)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_rows + dv[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


def paged_attention(q, k, v, kv_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                    k_scale=None, v_scale=None, cos=None, sin=None, rotary_interleaved=False, alibi_slopes=None, softcap=0.0,
                    sinks=None, max_query_len=None, block_n=None):
    """The op (llmc/plugins/attention.py's signature), plus the launch's knobs: `max_query_len` (the step's longest
    run of new tokens, when the caller knows it without a sync) and `block_n` (keys per tile)."""
    _check(q, k, v, kv_cache, layer, block_tables, seq_lens, query_start_loc, k_scale, v_scale)
    if cos is not None:
        q, k = _rope(q, cos, sin, rotary_interleaved), _rope(k, cos, sin, rotary_interleaved)
    write_kv_cache(k, v, kv_cache, layer, slot_mapping, k_scale, v_scale)

    q, block_tables = _unit_stride(q), block_tables.contiguous()
    heads, tokens, dk = q.shape[1:]
    kv_heads, dv = k.shape[1], v.shape[-1]
    out = attention_output(q, dv)
    group = heads // kv_heads
    group_p2 = pow2(group)
    max_query_len = tokens if max_query_len is None else max_query_len
    block_q = min(pow2(max_query_len), max(1, 64 // group_p2))
    block_q = max(block_q, 16 // min(group_p2, 16))  # tl.dot needs 16 rows
    block_n = block_n or (64 if max(dk, dv) <= 128 else 32)
    grid = (seq_lens.shape[0], triton.cdiv(max_query_len, block_q), kv_heads)
    if tokens == 0 or grid[0] == 0:
        return out
    cache = kv_cache[layer]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    unused = seq_lens  # a pointer for the optional inputs not given (never read: their flag is off)
    _paged_attention_kernel[grid](
        q[0], cache, out[0], block_tables, seq_lens, query_start_loc,
        k_scale if fp8 else unused, v_scale if fp8 else unused,
        unused if alibi_slopes is None else alibi_slopes, unused if sinks is None else sinks,
        float(scale), float(softcap), int(sliding_window), cache.shape[2],
        q.stride(2), q.stride(1), out.stride(2), out.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_N=block_n,
        DK=dk, DV=dv, DK_P2=pow2(dk, 16), DV_P2=pow2(dv, 16),
        FP8=fp8, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi_slopes is not None, HAS_SINKS=sinks is not None,
        PRECISION=dot_precision(q.dtype),
    )
    return out


def _rope(x, cos, sin, interleaved):
    """x [1, heads, T, d] with RoPE on its first rotary_dim channels (the reference's apply_rope)."""
    dim = cos.shape[-1]
    return rotary_embedding(x, cos.view(1, 1, -1, dim), sin.view(1, 1, -1, dim), interleaved, partial=True)


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, kv_cache, layer, block_tables, seq_lens, query_start_loc, k_scale, v_scale):
    """The shapes the kernel relies on (the indices inside the tensors are not read back: that would sync)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[0] != 1:
        raise RuntimeError("paged_attention: q, k, v must be [1, heads, tokens, head_dim]")
    if k.shape[:3] != v.shape[:3] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        raise RuntimeError(f"paged_attention: k and v must be [1, kv_heads, tokens, d] like q {tuple(q.shape)}, "
                           f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise RuntimeError(f"paged_attention: {q.shape[1]} query heads do not share {k.shape[1]} KV heads evenly")
    if kv_cache.dim() != 6 or not kv_cache.is_contiguous() or kv_cache.shape[4] != k.shape[1] \
            or kv_cache.shape[5] != max(k.shape[3], v.shape[3]):
        raise RuntimeError("paged_attention: kv_cache must be a contiguous [layers, 2, blocks, block_size, kv_heads, "
                           f"max(dk, dv)] tensor for {k.shape[1]} KV heads, got {tuple(kv_cache.shape)}")
    if not 0 <= layer < kv_cache.shape[0]:
        raise RuntimeError(f"paged_attention: layer {layer} is outside the cache's {kv_cache.shape[0]} layers")
    if query_start_loc.shape != (seq_lens.shape[0] + 1,) or block_tables.shape[0] != seq_lens.shape[0]:
        raise RuntimeError("paged_attention: query_start_loc must have one more entry than seq_lens, and "
                           "block_tables one row per sequence")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if (k_scale is not None, v_scale is not None) != (fp8, fp8):
        raise RuntimeError("paged_attention: an FP8 KV cache takes k_scale and v_scale, and only it does")
