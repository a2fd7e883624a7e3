"""`--quant-algo gptq`: Hessian-based error compensation (Frantar et al., "GPTQ", 2022), with the format's own quantizer.

Columns of W [N, K] are quantized left to right; each column's rounding error is spread over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = X^T X over the
calibration tokens), so that the layer's output on those inputs, not the weight, stays close. Blocks of
128 columns are updated lazily; H is dampened by 1% of its mean diagonal. The scales are fixed as the
columns are reached: FP8's per-row scales and NVFP4's global scale up front (from the MSE search on
the original weight), each NVFP4 block scale when its 16 columns come up, searched on their updated values.
"""

from __future__ import annotations

import torch

from llmc.passes.quant_algos.mse import mse_fp8_weight, mse_nvfp4, search_block_scales
from llmc.plugins.quant_formats import NVFP4_BLOCK, _positive, fp4_e2m1_decode, fp4_e2m1_encode, pack_fp4, quantize_fp8

BLOCK = 128
DAMPENING = 0.01


def _inverse_hessian_factor(hessian: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (dampened); columns no input ever reached are zeroed in w (in place)."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += DAMPENING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, fmt: str) -> tuple[torch.Tensor, ...]:
    """[N, K] weights and the [K, K] Hessian of their inputs -> the format's packed tensors (as quantize_fp8_weight /
    quantize_nvfp4 return them)."""
    w = w.detach().float().clone()
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"gptq: the Hessian is {tuple(hessian.shape)}, the weight has {k} input features")
    hinv = _inverse_hessian_factor(hessian, w)
    if fmt == "fp8":
        _, row_scale = mse_fp8_weight(w)
        scale = row_scale[:, None]
    else:
        _, _, global_scale = mse_nvfp4(w)
        block_scales = torch.zeros((n, k // NVFP4_BLOCK), dtype=torch.float8_e4m3fn)
    q = torch.zeros_like(w)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        w1, err1, h1 = w[:, start:end].clone(), torch.zeros((n, end - start)), hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if fmt == "fp8":
                q[:, col] = quantize_fp8(w1[:, i : i + 1], scale).float()[:, 0] * scale[:, 0]
            else:
                if col % NVFP4_BLOCK == 0:  # a new block: its scale from the block's columns as they are now
                    block_scales[:, col // NVFP4_BLOCK], _, _ = search_block_scales(w1[:, i : i + NVFP4_BLOCK], global_scale)
                q[:, col] = _fp4_column(w1[:, i], block_scales[:, col // NVFP4_BLOCK], global_scale)
            err = (w1[:, i] - q[:, col]) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, end:] -= err1 @ hinv[start:end, end:]
    if fmt == "fp8":
        return quantize_fp8(q, scale), row_scale
    scale = (block_scales.float() * global_scale).repeat_interleave(NVFP4_BLOCK, dim=1)
    return pack_fp4(fp4_e2m1_encode(q / _positive(scale))), block_scales, global_scale


def _fp4_column(column: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """One column [N] rounded to E2M1 with each row's block scale, read back (a zero scale reads back zeros)."""
    scale = block_scale.float() * global_scale
    return fp4_e2m1_decode(fp4_e2m1_encode(column / _positive(scale))) * scale
