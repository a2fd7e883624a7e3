"""The first half of llmc::paged_attention on CUDA: the step's new keys and values into the paged cache at their
slots, in one launch (reference: write_kv_cache in llmc/plugins/attention.py).

A program writes one token's K and V rows for one KV head, zero-padded to the cache's head dim (K and V of
different head dims). An FP8 cache gets x / scale rounded to E4M3 by integer arithmetic, nearest-even and saturating
at 448 as torch's cast is, so the bytes are the reference's on every GPU and in Triton's interpreter (whose own
cast rounds otherwise). Slots are not checked on the device (that would cost a sync): the CPU kernel checks them,
and the scheduler makes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.triton.common import pow2


@triton.jit
def _e4m3_bits(x):
    """fp32 -> E4M3 (fn) codes as int32, nearest even, saturating at +-448."""
    a = tl.minimum(tl.abs(x), 448.0)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # multiples of 2^-9, rounded to nearest even
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3)  # 3 mantissa bits, nearest even
    return tl.where(a < 0.015625, subnormal, normal) | sign


@triton.jit
def _kv_cache_write_kernel(k_ptr, v_ptr, cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh, stride_kv, stride_slot, stride_head,
                           DK: tl.constexpr, DV: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr, FP8: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    d = tl.arange(0, D_P2)
    row = cache_ptr + slot * stride_slot + head * stride_head + d
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=d < DK, other=0.0)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=d < DV, other=0.0)
    if FP8:
        k = _e4m3_bits(tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr).to(tl.float32))).to(tl.uint8)
        v = _e4m3_bits(tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr).to(tl.float32))).to(tl.uint8)
    tl.store(row, k.to(cache_ptr.dtype.element_ty), mask=d < D)
    tl.store(row + stride_kv, v.to(cache_ptr.dtype.element_ty), mask=d < D)


def write_kv_cache(k, v, kv_cache, layer, slot_mapping, k_scale=None, v_scale=None) -> None:
    """k [1, kv_heads, T, dk] and v [1, kv_heads, T, dv] into kv_cache[layer] at slot_mapping [T]."""
    _, _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    tokens, dk, dv = k.shape[2], k.shape[3], v.shape[3]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    cache = kv_cache[layer].view(2, num_blocks * block_size, kv_heads, head_dim)
    cache = cache.view(torch.uint8) if fp8 else cache
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    if tokens and kv_heads:
        _kv_cache_write_kernel[(tokens, kv_heads)](
            k, v, cache, slot_mapping, k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
            k.stride(2), k.stride(1), v.stride(2), v.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
            DK=dk, DV=dv, D=head_dim, D_P2=pow2(head_dim), FP8=fp8,
        )
