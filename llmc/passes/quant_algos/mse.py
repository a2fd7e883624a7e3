"""`--quant-algo mse`: weight scales chosen to minimise the weight's quantization error, not from its amax.

Round-to-nearest scales a channel (FP8) or a block (NVFP4) by its largest value, so one outlier
coarsens the grid for all the others. Here each scale is searched over a grid of clipping ratios
(ratio x amax), keeping per channel / per block the one with the least squared error; ratio 1 (RTN's
choice) is on the grid, so the error is never larger than RTN's. NVFP4's global scale is searched
the same way, each candidate with its best block scales. Every candidate is one vectorised pass over
the tensor. The results are the formats' own packed tensors (llmc/plugins/quant_formats.py).
"""

from __future__ import annotations

import torch

from llmc.plugins.quant_formats import (
    E2M1_MAX, E4M3_MAX, _blocks, _positive, fp4_e2m1_decode, fp4_e2m1_encode, nvfp4_global_scale, pack_fp4, quantize_fp8,
)

FP8_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))  # 1.0 (RTN's) exactly, down to 0.5
# Block scales are E4M3 (1/8 steps): ratios above 1 can round a block scale to a closer value too.
NVFP4_BLOCK_RATIOS = tuple(1.0 + 0.05 * i for i in range(2, -9, -1))  # 1.1 down to 0.6, 1.0 exactly
NVFP4_GLOBAL_RATIOS = (1.0, 0.94, 0.88, 1.06)  # finer grids measured no better on the example model


def mse_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (E4M3 codes [N, K], float32 scales [N]), as quantize_fp8_weight, each row's scale searched."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = _positive(amax / E4M3_MAX)
    for ratio in FP8_RATIOS:
        scale = _positive(amax * ratio / E4M3_MAX)
        err = (quantize_fp8(w, scale[:, None]).float() * scale[:, None] - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    return quantize_fp8(w, best_scale[:, None]), best_scale


def search_block_scales(blocks: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [..., 16] -> (E4M3 block scales [...], the fake-quantized blocks, their squared error [...]) with
    each block's scale the best of the grid, under `global_scale`."""
    amax = blocks.abs().amax(dim=-1)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = torch.zeros(amax.shape, dtype=torch.float8_e4m3fn)
    best_values = torch.zeros_like(blocks)
    for ratio in NVFP4_BLOCK_RATIOS:
        block_scale = quantize_fp8(amax * ratio / E2M1_MAX, global_scale)
        scale = block_scale.float()[..., None] * global_scale
        values = fp4_e2m1_decode(fp4_e2m1_encode(blocks / _positive(scale))) * scale
        err = (values - blocks).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, block_scale.float(), best_scale.float()).to(torch.float8_e4m3fn)
        best_values = torch.where(better[..., None], values, best_values)
    return best_scale, best_values, best_err


def mse_nvfp4(w: torch.Tensor, global_scale: torch.Tensor | None = None):
    """[N, K] -> (packed E2M1 [N, K/2], E4M3 block scales [N, K/16], float32 global scale []), as quantize_nvfp4,
    with the global scale (unless given) and every block scale searched."""
    blocks = _blocks(w.detach())
    rtn_global = nvfp4_global_scale(w)
    candidates = [rtn_global * r for r in NVFP4_GLOBAL_RATIOS] if global_scale is None else [global_scale.float().reshape(())]
    best = None
    for gs in candidates:
        block_scale, _, err = search_block_scales(blocks, gs)
        if best is None or err.sum() < best[0]:
            best = (err.sum(), block_scale, gs)
    _, block_scale, gs = best
    scale = block_scale.float()[..., None] * gs
    codes = fp4_e2m1_encode(blocks / _positive(scale))
    return pack_fp4(codes.flatten(-2)), block_scale, gs
