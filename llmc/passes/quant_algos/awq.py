"""`--quant-algo awq`: activation-aware weight scaling (Lin et al., "AWQ", 2023).

Input channels that carry large activations matter most to a layer's output. For the linears that
read one input X (Q/K/V after a norm, gate/up, down after the gated activation), a per-input-channel
scale s = mean|X|^alpha (normalised) multiplies their weights' columns before quantization, and
1/s is folded exactly into whatever produces X (llmc/passes/smooth_activations.py), so salient
channels get a finer grid. alpha is searched on a grid, minimising the linears' output error on
calibration inputs with the format's round-to-nearest quantizer; alpha 0 (no scaling) is on the grid.
"""

from __future__ import annotations

from typing import Callable

import torch

ALPHAS = tuple(i / 20 for i in range(20))


def awq_scales(stats: dict, weights: list[torch.Tensor], fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(per-input-channel scales [K], the chosen alpha) for the linears over one input with calibration `stats`."""
    x = stats["inputs"].float()
    mean = stats["channel_mean_abs"].float().clamp(min=1e-6)
    weights = [w.float() for w in weights]
    reference = [x @ w.T for w in weights]
    best = (float("inf"), torch.ones_like(mean), 0.0)
    for alpha in ALPHAS:
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = sum((x @ (fake_quantize(w * s) / s).T - ref).pow(2).sum().item() for w, ref in zip(weights, reference))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]
