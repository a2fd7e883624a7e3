"""Quantize: linears become FP8 or NVFP4 linears over packed weights (DESIGN.md, "Quantization formats").

    fp8                 W8A8: E4M3 weights with a scale per output channel; the input quantized to E4M3
                        with a static per-tensor scale (calibrated amax / 448)
    fp8-weight-only     E4M3 weights as above; the input stays in the build dtype
    nvfp4               W4A4: E2M1 weights in blocks of 16 along K with E4M3 block scales and an FP32
                        global scale; the input quantized the same way per block at run time, with a
                        calibrated global scale (amax / (6 x 448))
    nvfp4-weight-only   NVFP4 weights as above; the input stays in the build dtype

It runs per rank, after sharding and merging, so scales are those of the weights each rank holds and
a merged Q/K/V or gate/up weight shares one input scale. Linears whose weight name matches an
`exclude` pattern (fnmatch) stay in the build dtype; the pattern `lm_head` also names the logits
projection whatever its weight is called (tied embeddings). NVFP4 needs K divisible by 16: other
linears stay in the build dtype and are listed in the record.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

import llmc.plugins.quant_linear  # noqa: F401  (registers torch.ops.llmc.fp8_linear / nvfp4_linear)
from llmc.passes.manager import BuildContext, PassError, register_pass
from llmc.plugins.quant_formats import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK, quantize_fp8_weight, quantize_nvfp4

LINEAR = torch.ops.llmc.linear.default
# mode -> (weight format, whether activations are quantized too)
QUANT_MODES = {
    "fp8": ("fp8", True),
    "fp8-weight-only": ("fp8", False),
    "nvfp4": ("nvfp4", True),
    "nvfp4-weight-only": ("nvfp4", False),
}
# Ops a logits projection's output may pass through on its way to the program's output.
_PASS_THROUGH = {
    torch.ops.llmc.all_gather.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.index_select.default, torch.ops.aten._to_copy.default,
}


def needs_calibration(quant_mode: str | None) -> bool:
    return quant_mode is not None and QUANT_MODES[quant_mode][1]


def _logits_projection(gm: fx.GraphModule) -> fx.Node | None:
    node = gm.graph.output_node().args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    while isinstance(node, fx.Node) and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.target == LINEAR else None


def _excluded(node: fx.Node, patterns: tuple[str, ...], lm_head: fx.Node | None) -> bool:
    name = node.args[1].target
    return any(fnmatch.fnmatchcase(name, p) or (p == "lm_head" and node is lm_head) for p in patterns)


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    owner, _, attr = name.rpartition(".")
    gm.get_submodule(owner).register_buffer(attr, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


@register_pass("quantize", lossy=True)
def quantize(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.quant_mode is None:
        return gm, {"mode": None}
    if ctx.quant_mode not in QUANT_MODES:
        raise PassError(f"quantization must be one of {', '.join(QUANT_MODES)}, got {ctx.quant_mode!r}")
    fmt, quantize_inputs = QUANT_MODES[ctx.quant_mode]
    input_amax = ctx.activation_amax.get("linear", {})
    if quantize_inputs and not input_amax:
        raise PassError(f"--quant {ctx.quant_mode} quantizes activations and needs calibration: the build gave no samples")
    lm_head = _logits_projection(gm)
    quantized, kept, bytes_before, bytes_after = 0, [], 0, 0
    for node in list(gm.graph.nodes):
        if node.target != LINEAR or node.args[1].op != "get_attr":
            continue
        x, w_node, bias = node.args
        name = w_node.target
        w = gm.get_buffer(name)
        if _excluded(node, ctx.quant_exclude, lm_head) or (fmt == "nvfp4" and w.shape[1] % NVFP4_BLOCK):
            kept.append(name)
            continue
        # Calibration saw the weights before merge_linears; a merged weight is named after its first part.
        amax = input_amax.get(name.removesuffix("_merged"), 0.0) or 1.0
        if fmt == "fp8":
            q, scale = quantize_fp8_weight(w.float())
            args = (_register(gm, name + "_fp8", q, node), _register(gm, name + "_fp8_scale", scale, node))
            input_scale = torch.tensor(amax / E4M3_MAX, dtype=torch.float32)
            target = torch.ops.llmc.fp8_linear.default
        else:
            packed, block_scale, global_scale = quantize_nvfp4(w.float())
            args = (
                _register(gm, name + "_nvfp4", packed, node),
                _register(gm, name + "_nvfp4_block_scale", block_scale, node),
                _register(gm, name + "_nvfp4_global_scale", global_scale, node),
            )
            input_scale = torch.tensor(amax / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)
            target = torch.ops.llmc.nvfp4_linear.default
        input_scale = _register(gm, name + "_input_scale", input_scale, node) if quantize_inputs else None
        node.target, node.args = target, (x, *args, input_scale, bias)
        bytes_before += w.numel() * w.element_size()
        bytes_after += sum(gm.get_buffer(a.target).nbytes for a in args)
        quantized += 1
    return gm, {
        "mode": ctx.quant_mode,
        "quantized": quantized,
        "kept": kept,
        "weight_mb_before": round(bytes_before / 1e6, 3),
        "weight_mb_after": round(bytes_after / 1e6, 3),
    }
