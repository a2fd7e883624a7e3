"""The quantized number formats, in plain torch: the reference the CPU kernels are tested against.

FP8 E4M3 (``torch.float8_e4m3fn``, largest value 448): a tensor is stored as ``q = e4m3(x / scale)``
and read back as ``q * scale``. Weights have one scale per output channel (channel amax / 448),
activations one static per-tensor scale from calibration.

NVFP4: E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit, in blocks of 16 along K; each block
has an E4M3 scale and the tensor an FP32 global scale (amax / (6 x 448)), so a value is
``e2m1 * block_scale * global_scale``. Two E2M1 codes share a byte: element 2j in the low nibble,
2j + 1 in the high one (NVIDIA's and ONNX's FLOAT4E2M1 packing).

Rounding is to nearest, ties to even, saturating at the largest finite value, which is what
``ml_dtypes`` does in range (the tests check it bit for bit).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16

# E2M1 magnitudes by code 0..7; codes 8..15 are the same with the sign bit (bit 3) set.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_BY_CODE = E2M1_VALUES + tuple(-v for v in E2M1_VALUES)
# Midpoints between neighbouring magnitudes. A tie rounds to the even code: down at the midpoints
# above an even code (0.25 -> 0, 1.25 -> 1, 2.5 -> 2, 5 -> 4), up at the others (0.75 -> 1, ...).
E2M1_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)
E2M1_TIES_UP = (0.75, 1.75, 3.5)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to E4M3 (nearest, ties to even), saturated to +-448; scale broadcasts
    (a scalar per tensor, or [N, 1] per output channel)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero channel or tensor has amax 0: give it scale 1 so nothing divides by zero."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weights -> (E4M3 codes [N, K], float32 scales [N]), one scale per output channel."""
    scale = _positive(w.detach().abs().amax(dim=1).float() / E4M3_MAX)
    return quantize_fp8(w, scale[:, None]), scale


def fp4_e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 codes (uint8 0..15: bit 3 the sign, bits 0-2 the magnitude's index), ties to
    even, saturating at 6. -0 and negatives that round to zero keep the sign; NaN gives code 8, as
    in ml_dtypes."""
    a = x.float().abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in E2M1_TIES_DOWN:
        code += a > m
    for m in E2M1_TIES_UP:
        code += a >= m
    code |= torch.signbit(x).to(torch.uint8) << 3
    return code.masked_fill_(torch.isnan(x), 8)


def fp4_e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(E2M1_BY_CODE, device=codes.device)[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2j in the low nibble and 2j + 1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: the last dimension ({codes.shape[-1]}) must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., K/16, 16] in float32."""
    if x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 quantizes blocks of {NVFP4_BLOCK} along the last dimension, but it has "
                         f"{x.shape[-1]} elements: keep this layer in a wider format (e.g. FP8)")
    return x.float().unflatten(-1, (-1, NVFP4_BLOCK))


def _quantize_blocks(blocks: torch.Tensor, global_scale: torch.Tensor):
    """-> (E2M1 codes like blocks, E4M3 block scales [..., K/16], their float32 value times the
    global scale [..., K/16, 1])."""
    block_scale = quantize_fp8(blocks.abs().amax(dim=-1) / E2M1_MAX, global_scale)
    scale = block_scale.float()[..., None] * global_scale
    return fp4_e2m1_encode(blocks / _positive(scale)), block_scale, scale


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """amax / (6 x 448) as a float32 scalar, so the largest block scale is E4M3's largest value."""
    return _positive(x.detach().abs().amax().float() / (E2M1_MAX * E4M3_MAX))


def quantize_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None):
    """[N, K] weights (K a multiple of 16) -> (packed E2M1 uint8 [N, K/2], E4M3 block scales
    [N, K/16], float32 global scale [])."""
    blocks = _blocks(w.detach())
    global_scale = nvfp4_global_scale(w) if global_scale is None else global_scale.float().reshape(())
    codes, block_scale, _ = _quantize_blocks(blocks, global_scale)
    return pack_fp4(codes.flatten(-2)), block_scale, global_scale


def dequantize_nvfp4(packed, block_scale, global_scale, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = _blocks(fp4_e2m1_decode(unpack_fp4(packed)))
    return (values * (block_scale.float()[..., None] * global_scale.float())).flatten(-2).to(dtype)


def fake_quantize_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] quantized to NVFP4 block by block (dynamic block scales, the given calibrated
    global scale) and read back, in x's dtype: what W4A4 feeds the weights."""
    codes, _, scale = _quantize_blocks(_blocks(x), global_scale.float().reshape(()))
    return (fp4_e2m1_decode(codes) * scale).flatten(-2).to(x.dtype)
