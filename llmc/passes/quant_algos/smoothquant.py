"""`--quant-algo smoothquant`: migrate activation outliers into the weights (Xiao et al., "SmoothQuant", 2022).

For W8A8 (and W4A4) a few input channels with huge activations waste the static activation scale.
Per input channel, s = max|X|^alpha / max|W|^(1 - alpha) with alpha 0.5 divides the activations
(folded exactly into the preceding norm, llmc/passes/smooth_activations.py) and multiplies the
weights' columns, splitting the range between the two.
"""

from __future__ import annotations

import torch

ALPHA = 0.5


def smoothquant_scales(stats: dict, weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel scales [K] for the linears over one input; channels never active keep 1."""
    x_amax = stats["channel_amax"].float()
    w_amax = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = x_amax.pow(ALPHA) / w_amax.pow(1 - ALPHA)
    return torch.where((x_amax > 0) & (w_amax > 0), s.clamp(min=1e-5), torch.ones_like(s))
