"""Smooth activations: per-input-channel scales for `--quant-algo awq` / `smoothquant`, folded exactly into the graph.

A group is the linears reading one input X and what produces X: a norm (llmc::rms_norm,
llmc::add_rms_norm, llmc::add_layer_norm) whose output only those linears read, or an up projection
whose output only a gated activation reads, whose output only the down projection reads. With
scales s [K] from the algorithm, the producer's weight (and bias) is divided by s and the linears'
weight columns multiplied by it: the model computes the same function (up to rounding), and the
quantize pass then quantizes the scaled weights. Inputs without such a producer (attention's output
projection, non-gated MLPs) stay as they are. It runs on the whole model, after calibration, whose
per-linear input amax it updates (the static activation scales of W8A8 / W4A4 are over X / s).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, register_pass
from llmc.passes.quant_algos import SMOOTHING
from llmc.passes.quant_algos.awq import awq_scales
from llmc.passes.quant_algos.smoothquant import smoothquant_scales
from llmc.passes.quantize import LINEAR, QUANT_MODES, _excluded, _logits_projection
from llmc.plugins.quant_formats import NVFP4_BLOCK, dequantize_fp8, dequantize_nvfp4, quantize_fp8_weight, quantize_nvfp4
from llmc.weights import set_weight

NORMS = {  # norm op -> (weight's argument index, bias's or None)
    torch.ops.llmc.rms_norm.default: (1, None),
    torch.ops.llmc.add_rms_norm.default: (2, None),
    torch.ops.llmc.add_layer_norm.default: (2, 3),
}
GATED = torch.ops.llmc.gated_activation.default


def _fake_quantize(fmt: str):
    if fmt == "fp8":
        return lambda w: dequantize_fp8(*(lambda q, s: (q, s[:, None]))(*quantize_fp8_weight(w)))
    return lambda w: dequantize_nvfp4(*quantize_nvfp4(w))


def _sole_attr(gm: fx.GraphModule, node) -> str | None:
    """The weight a get_attr node reads, if no other node of the graph reads it (a tied weight cannot be rescaled)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return node.target if len(readers) == 1 and len(node.users) == 1 else None


def _groups(gm: fx.GraphModule) -> list[tuple[list[tuple[str, int, bool]], list[str]]]:
    """[(producer's weights to divide [(name, dim, is_bias)], the linears' weights to scale)] for each foldable input."""
    groups = []
    for node in gm.graph.nodes:
        if node.target in NORMS:
            w_index, b_index = NORMS[node.target]
            out = node if node.target == torch.ops.llmc.rms_norm.default else next(
                (u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
            producer = [(_sole_attr(gm, node.args[w_index]), 0, False)]
            if b_index is not None and node.args[b_index] is not None:
                producer.append((_sole_attr(gm, node.args[b_index]), 0, True))
        elif node.target == GATED and node.args[1].target == LINEAR and len(node.args[1].users) == 1 and len(node.users) == 1:
            up = node.args[1]
            out = node
            producer = [(_sole_attr(gm, up.args[1]), 0, False)]
            if up.args[2] is not None:
                producer.append((_sole_attr(gm, up.args[2]), 0, True))
        else:
            continue
        if out is None or not out.users or any(name is None for name, _, _ in producer):
            continue
        linears = list(out.users)
        if all(u.target == LINEAR and u.args[0] is out and _sole_attr(gm, u.args[1]) for u in linears):
            groups.append((producer, linears))
    return groups


@register_pass("smooth_activations")
def smooth_activations(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.quant_algo not in SMOOTHING:
        return gm, {"algo": ctx.quant_algo, "groups": 0}
    fmt = QUANT_MODES[ctx.quant_mode][0]
    lm_head = _logits_projection(gm)
    fake_quantize = _fake_quantize(fmt)
    amax = ctx.activation_amax.get("linear", {})
    smoothed, alphas = 0, []
    for producer, linears in _groups(gm):
        names = [lin.args[1].target for lin in linears]
        weights = [gm.get_buffer(n) for n in names]
        if (any(_excluded(n, ctx.quant_exclude, "lm_head" if lin is lm_head else None) for n, lin in zip(names, linears))
                or (fmt == "nvfp4" and weights[0].shape[1] % NVFP4_BLOCK) or names[0] not in ctx.activation_stats):
            continue
        stats = ctx.activation_stats[names[0]]
        if ctx.quant_algo == "awq":
            s, alpha = awq_scales(stats, weights, fake_quantize)
            alphas.append(alpha)
        else:
            s = smoothquant_scales(stats, weights)
        for name, w in zip(names, weights):
            set_weight(gm, name, (w.float() * s).to(w.dtype))
            if name in amax:
                amax[name] = (stats["channel_amax"] / s).max().item() if "channel_amax" in stats else amax[name]
        for name, _, _ in producer:
            w = gm.get_buffer(name)
            divisor = s if w.dim() == 1 else s[:, None]  # a norm's weight / bias [K], an up projection's rows [K, ...]
            set_weight(gm, name, (w.float() / divisor).to(w.dtype))
        smoothed += 1
    record = {"algo": ctx.quant_algo, "groups": smoothed}
    if alphas:
        record["mean_alpha"] = round(sum(alphas) / len(alphas), 3)
    return gm, record
