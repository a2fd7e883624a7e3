"""Calibration algorithms beyond round-to-nearest (`--quant-algo`), one file each, against llmc's own formats.

    rtn          round to nearest with amax scales (per output channel for FP8, per block of 16 and
                 per tensor for NVFP4)
    mse          each scale searched to minimise the weight's quantization error (mse.py)
    awq          activation-aware per-input-channel scaling folded into the preceding norm or up
                 projection, then mse (awq.py)
    gptq         Hessian-based column-by-column error compensation, with mse's scales (gptq.py)
    smoothquant  activation outliers migrated into the weights (W8A8/W4A4 only), then mse (smoothquant.py)

llm-compressor and Model Optimizer implement these too, but installing either here would replace
the transformers and numpy llmc is built against, so llmc carries compact versions of its own.
Weights no calibration statistic reaches (embeddings, MoE experts) take mse under every algorithm but rtn.
"""

from __future__ import annotations

import torch

from llmc.passes.quant_algos.gptq import gptq_quantize
from llmc.passes.quant_algos.mse import mse_fp8_weight, mse_nvfp4
from llmc.plugins.quant_formats import quantize_fp8_weight, quantize_nvfp4

QUANT_ALGOS = ("rtn", "mse", "awq", "gptq", "smoothquant")
# The activation statistics (llmc/passes/calibrate.py) each algorithm needs beyond the inputs' amax.
STATISTICS = {"awq": ("channel_amax", "channel_mean_abs", "inputs"), "smoothquant": ("channel_amax",), "gptq": ("hessian",)}
SMOOTHING = ("awq", "smoothquant")


def check_algo(quant_mode: str | None, algo: str, quantizes_activations: bool) -> None:
    """ValueError with the fix when `algo` does not apply to `quant_mode`."""
    if algo not in QUANT_ALGOS:
        raise ValueError(f"quant_algo must be one of {', '.join(QUANT_ALGOS)}, got {algo!r}")
    if algo != "rtn" and quant_mode is None:
        raise ValueError(f"--quant-algo {algo} chooses how weights are quantized; give --quant too")
    if algo == "smoothquant" and not quantizes_activations:
        raise ValueError(f"smoothquant eases activation quantization and --quant {quant_mode} keeps activations unquantized; "
                         "use a W8A8/W4A4 mode (fp8, nvfp4) or another --quant-algo (mse, awq, gptq)")


def quantize_weight(w: torch.Tensor, fmt: str, algo: str, hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """[N, K] weights -> the format's packed tensors (fp8: codes, scales; nvfp4: packed, block scales, global scale)."""
    w = w.float()
    if algo == "rtn":
        return quantize_fp8_weight(w) if fmt == "fp8" else quantize_nvfp4(w)
    if algo == "gptq" and hessian is not None:
        return gptq_quantize(w, hessian, fmt)
    return mse_fp8_weight(w) if fmt == "fp8" else mse_nvfp4(w)
