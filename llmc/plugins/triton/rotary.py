"""llmc::rotary_embedding on CUDA: x * cos + rotate(x) * sin in one pass over x (reference: llmc/plugins/rotary.py).

x has up to 4 dims, its last the head dim; cos and sin broadcast to x's leading dims (read through stride-0
dims, never materialised) and may cover only the first rotary_dim channels: the rest pass through, as in the
partial RoPE that paged attention folds in. Each product is rounded to the output's dtype before the sum, as the
reference's torch ops round them, so bf16 results match it bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmc.plugins.triton.common import pow2

BLOCK_ROWS = 16


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, size1, size2,
                   sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2,
                   D: tl.constexpr, D_P2: tl.constexpr, ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    i2, i1, i0 = row % size2, row // size2 % size1, row // (size1 * size2)
    d = tl.arange(0, D_P2)
    row_ok = row < rows
    if INTERLEAVED:  # channel 2i turns with 2i + 1
        partner, sign = d ^ 1, tl.where(d % 2 == 0, -1.0, 1.0)
    else:  # channel i with i + rotary_dim / 2
        partner = tl.where(d < ROTARY // 2, d + ROTARY // 2, d - ROTARY // 2)
        sign = tl.where(d < ROTARY // 2, -1.0, 1.0)
    x_row = x_ptr + (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None]
    rotated = row_ok[:, None] & (d[None, :] < ROTARY)
    x = tl.load(x_row + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    x_partner = tl.load(x_row + partner[None, :], mask=rotated, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + d[None, :], mask=rotated, other=0.0)
    sin = tl.load(sin_ptr + (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + d[None, :], mask=rotated, other=0.0)
    dtype = out_ptr.dtype.element_ty
    turned = (x * cos.to(tl.float32)).to(dtype).to(tl.float32) \
        + (sign[None, :] * x_partner * sin.to(tl.float32)).to(dtype).to(tl.float32)
    out = tl.where(d[None, :] < ROTARY, turned, x)
    tl.store(out_ptr + row[:, None] * D + d[None, :], out.to(dtype), mask=row_ok[:, None] & (d[None, :] < D))


def rotary_embedding(x, cos, sin, interleaved=False, partial=False):
    """x [..., d] (up to 4 dims) with RoPE; cos and sin broadcast to x. With `partial` (paged attention's folded RoPE)
    they may cover only the first rotary_dim channels; the op itself takes them whole, as its reference does."""
    rotary_dim, head_dim = cos.shape[-1], x.shape[-1]
    if x.dim() > 4 or sin.shape[-1] != rotary_dim or rotary_dim > head_dim or rotary_dim % 2 \
            or (rotary_dim != head_dim and not partial):
        raise RuntimeError(f"rotary_embedding: x {tuple(x.shape)} (at most 4-D) takes cos and sin of its last dim "
                           f"(even), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    x4 = _four_dims(x if x.stride(-1) == 1 else x.contiguous())
    lead = x4.shape[:-1]
    cos4, sin4 = (_four_dims(t.contiguous()).expand(*lead, rotary_dim) for t in (cos, sin))
    rows = x4.shape[0] * x4.shape[1] * x4.shape[2]
    if rows:
        _rotary_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            x4, cos4, sin4, out, rows, lead[1], lead[2], *x4.stride()[:3], *cos4.stride()[:3], *sin4.stride()[:3],
            D=head_dim, D_P2=pow2(head_dim), ROTARY=rotary_dim, INTERLEAVED=bool(interleaved), BLOCK_ROWS=BLOCK_ROWS,
        )
    return out


def _four_dims(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
