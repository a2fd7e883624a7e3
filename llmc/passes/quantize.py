"""Quantize: linears become FP8 or NVFP4 linears over packed weights (docs/design.md, "Quantization formats").

    fp8                 W8A8: E4M3 weights with a scale per output channel; the input quantized to E4M3
                        with a static per-tensor scale (calibrated amax / 448)
    fp8-dynamic         W8A8 as fp8, the input quantized with a scale per token (its amax / 448) at run time,
                        vLLM's default FP8: no calibration
    fp8-weight-only     E4M3 weights as above; the input stays in the build dtype
    nvfp4               W4A4: E2M1 weights in blocks of 16 along K with E4M3 block scales and an FP32
                        global scale; the input quantized the same way per block at run time, with a
                        calibrated global scale (amax / (6 x 448))
    nvfp4-weight-only   NVFP4 weights as above; the input stays in the build dtype

MoE experts (llmc::moe) become llmc::fp8_moe / llmc::nvfp4_moe, each expert's weights quantized on their own
as a linear's are; their inputs stay in the build dtype in every mode (no per-expert calibration yet).

The token embedding's table is stored in the same format (`llmc::fp8_embedding` /
`llmc::nvfp4_embedding` dequantize the rows they gather); a tied LM head shares the packed table.

It runs per rank, after sharding and merging, so scales are those of the weights each rank holds and
a merged Q/K/V or gate/up weight shares one input scale. Weights whose name matches an `exclude`
pattern (fnmatch) stay in the build dtype; the pattern `lm_head` also names the logits projection,
and `embedding` the token embedding, whatever their weights are called. NVFP4 needs K divisible by
16: other weights stay in the build dtype. The record lists every weight kept.

`--quant-algo` (ctx.quant_algo, llmc/passes/quant_algos) chooses how each weight is rounded: rtn
as above, or searched scales (mse), with GPTQ's error compensation from the Hessian calibration
recorded for the weight's input (a row-parallel shard takes its rows of it); awq and smoothquant
have already rescaled the weights (llmc/passes/smooth_activations.py) and round with mse.
"""

from __future__ import annotations

import fnmatch
import sys

import torch
import torch.fx as fx
from tqdm import tqdm

import llmc.plugins.quant_embedding  # noqa: F401  (registers the ops this pass inserts)
import llmc.plugins.quant_linear  # noqa: F401
from llmc.passes.graph import arg
from llmc.passes.manager import BuildContext, PassError, register_pass
from llmc.passes.quant_algos import STATISTICS, quantize_weight
from llmc.plugins.moe import OPTIONAL_ARG_NAMES
from llmc.plugins.quant_formats import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK
from llmc.weights import set_weight

LINEAR = torch.ops.llmc.linear.default
MOE = torch.ops.llmc.moe.default
EMBEDDING = torch.ops.aten.embedding.default
# mode -> (weight format, how activations are quantized: None (weight-only), "static" (calibrated) or "dynamic")
QUANT_MODES = {
    "fp8": ("fp8", "static"),
    "fp8-dynamic": ("fp8", "dynamic"),
    "fp8-weight-only": ("fp8", None),
    "nvfp4": ("nvfp4", "static"),
    "nvfp4-weight-only": ("nvfp4", None),
}
# Ops a logits projection's output may pass through on its way to the program's output.
_PASS_THROUGH = {
    torch.ops.llmc.all_gather.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
    torch.ops.aten.slice.Tensor, torch.ops.aten.index_select.default, torch.ops.aten._to_copy.default,
}


def needs_calibration(quant_mode: str | None, quant_algo: str = "rtn") -> bool:
    return quant_mode is not None and (QUANT_MODES[quant_mode][1] == "static" or quant_algo in STATISTICS)


def _logits_projection(gm: fx.GraphModule) -> fx.Node | None:
    node = gm.graph.output_node().args[0]
    node = node[0] if isinstance(node, (tuple, list)) else node
    while isinstance(node, fx.Node) and node.target in _PASS_THROUGH:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.target == LINEAR else None


def _excluded(name: str, patterns: tuple[str, ...], role: str | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or p == role for p in patterns)


def _register(gm: fx.GraphModule, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    set_weight(gm, name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


class _PackedWeights:
    """Each weight quantized once (a tied LM head and embedding share the result), read by get_attr nodes."""

    def __init__(self, gm: fx.GraphModule, fmt: str, ctx: BuildContext):
        self.gm, self.fmt, self.ctx = gm, fmt, ctx
        self.done: dict[str, dict[str, torch.Tensor]] = {}  # weight name -> {packed tensor's name: tensor}
        self.compensated = 0  # weights GPTQ quantized

    def __call__(self, name: str, before: fx.Node, is_linear: bool) -> tuple[fx.Node, ...]:
        if name in self.done:
            with self.gm.graph.inserting_before(before):
                return tuple(self.gm.graph.get_attr(n) for n in self.done[name])
        w = self.gm.get_buffer(name).float()
        # A table the embedding gathers from is no linear's weight here, even if a tied LM head's input was calibrated.
        hessian = self._hessian(name, w.shape[1]) if is_linear else None
        self.compensated += hessian is not None
        suffixes = ("", "_scale") if self.fmt == "fp8" else ("", "_block_scale", "_global_scale")
        parts = zip(suffixes, quantize_weight(w, self.fmt, self.ctx.quant_algo, hessian))
        self.done[name] = {f"{name}_{self.fmt}{suffix}": value for suffix, value in parts}
        return tuple(_register(self.gm, n, value, before) for n, value in self.done[name].items())

    def _hessian(self, name: str, features: int) -> torch.Tensor | None:
        """The Hessian of the weight's input (calibrated before merge_linears: a merged weight is named after its
        first part), narrowed to a row-parallel shard's input features; None for weights calibration did not see."""
        if self.ctx.quant_algo != "gptq":
            return None
        stats = self.ctx.activation_stats.get(name.removesuffix("_merged"))
        if stats is None or "hessian" not in stats:
            return None
        hessian, tp, rank = stats["hessian"], self.ctx.tp_size, self.ctx.tp_rank
        if hessian.shape[0] == features:
            return hessian
        if hessian.shape[0] == features * tp:  # Megatron's row-parallel shard: consecutive input features
            part = slice(rank * features, (rank + 1) * features)
            return hessian[part, part]
        raise PassError(f"gptq: the Hessian calibrated for {name} has {hessian.shape[0]} input features, the weight {features}")

    def nbytes(self) -> int:
        return sum(t.nbytes for parts in self.done.values() for t in parts.values())


@register_pass("quantize", lossy=True)
def quantize(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.quant_mode is None:
        return gm, {"mode": None}
    if ctx.quant_mode not in QUANT_MODES:
        raise PassError(f"quantization must be one of {', '.join(QUANT_MODES)}, got {ctx.quant_mode!r}")
    fmt, activations = QUANT_MODES[ctx.quant_mode]
    input_amax = ctx.activation_amax.get("linear", {})
    if activations == "static" and not input_amax:
        raise PassError(f"--quant {ctx.quant_mode} quantizes activations and needs calibration: the build gave no samples")
    lm_head = _logits_projection(gm)
    packed = _PackedWeights(gm, fmt, ctx)
    quantized, kept, bytes_before = 0, [], 0
    nodes = list(gm.graph.nodes)
    if ctx.quant_algo != "rtn":  # searched scales take seconds a weight on a large model: show progress
        nodes = tqdm(nodes, desc=f"[llmc] quantizing ({ctx.quant_algo})", unit="node", file=sys.stderr, leave=False)
    for node in nodes:
        if node.target == MOE and node.args[3].op == "get_attr" and node.args[4].op == "get_attr":
            names = [node.args[i].target for i in (3, 4)]
            weights = [gm.get_buffer(n) for n in names]
            if any(_excluded(n, ctx.quant_exclude, None) for n in names) or (
                fmt == "nvfp4" and any(w.shape[2] % NVFP4_BLOCK for w in weights)
            ):
                kept.extend(names)
                continue
            bytes_before += sum(w.nbytes for w in weights)
            packed_experts = [part for n, w in zip(names, weights) for part in _quantize_experts(gm, n, w, fmt, ctx.quant_algo, node)]
            x, ids, topk_weights, _, _, act, first_expert = node.args[:7]
            optional = {name: arg(node, name) for name in OPTIONAL_ARG_NAMES}  # biases stay in the build dtype
            node.target = torch.ops.llmc.fp8_moe.default if fmt == "fp8" else torch.ops.llmc.nvfp4_moe.default
            node.args, node.kwargs = (x, ids, topk_weights, *packed_experts, act, first_expert), optional
            quantized += 1
            continue
        is_linear = node.target == LINEAR and node.args[1].op == "get_attr"
        if not (is_linear or (node.target == EMBEDDING and node.args[0].op == "get_attr")):
            continue
        w_node = node.args[1] if is_linear else node.args[0]
        name, w = w_node.target, gm.get_buffer(w_node.target)
        role = "embedding" if not is_linear else "lm_head" if node is lm_head else None
        if _excluded(name, ctx.quant_exclude, role) or (fmt == "nvfp4" and w.shape[1] % NVFP4_BLOCK):
            kept.append(name)
            continue
        if name not in packed.done:
            bytes_before += w.nbytes
        weights = packed(name, node, is_linear)
        if not is_linear:
            target = torch.ops.llmc.fp8_embedding.default if fmt == "fp8" else torch.ops.llmc.nvfp4_embedding.default
            node.target, node.args, node.kwargs = target, (*weights, node.args[1], w.dtype), {}
        else:
            x, _, bias = node.args
            input_scale = None
            if activations == "dynamic":
                node.target, node.args = torch.ops.llmc.fp8_dynamic_linear.default, (x, *weights, bias)
                quantized += 1
                continue
            if activations == "static":
                # Calibration saw the weights before merge_linears; a merged weight is named after its first part.
                calibrated = name.removesuffix("_merged")
                if calibrated not in input_amax:
                    raise PassError(f"calibration saw no input of the linear over {calibrated}; it cannot have a static scale")
                amax = input_amax[calibrated] or 1.0  # an input that was always zero: any scale works
                scale = amax / E4M3_MAX if fmt == "fp8" else amax / (E2M1_MAX * E4M3_MAX)
                input_scale = _register(gm, name + "_input_scale", torch.tensor(scale, dtype=torch.float32), node)
            target = torch.ops.llmc.fp8_linear.default if fmt == "fp8" else torch.ops.llmc.nvfp4_linear.default
            node.target, node.args = target, (x, *weights, input_scale, bias)
        quantized += 1
    return gm, {
        "mode": ctx.quant_mode,
        "algo": ctx.quant_algo,
        **({"gptq_weights": packed.compensated} if ctx.quant_algo == "gptq" else {}),
        "quantized": quantized,
        "kept": kept,
        "weight_mb_before": round(bytes_before / 1e6, 3),
        "weight_mb_after": round((packed.nbytes() + expert_bytes(gm)) / 1e6, 3),
    }


def _quantize_experts(gm: fx.GraphModule, name: str, w: torch.Tensor, fmt: str, algo: str, before: fx.Node) -> list[fx.Node]:
    """Stacked expert weights [E, N, K], each expert quantized as a linear's [N, K] (no Hessian: experts are not
    calibrated): the packed tensors, stacked."""
    per_expert = [quantize_weight(e, fmt, algo) for e in w]
    suffixes = ("", "_scale") if fmt == "fp8" else ("", "_block_scale", "_global_scale")
    return [
        _register(gm, f"{name}_{fmt}{suffix}", torch.stack([parts[i] for parts in per_expert]), before)
        for i, suffix in enumerate(suffixes)
    ]


def expert_bytes(gm: fx.GraphModule) -> int:
    ops = (torch.ops.llmc.fp8_moe.default, torch.ops.llmc.nvfp4_moe.default)
    return sum(gm.get_buffer(a.target).nbytes for n in gm.graph.nodes if n.target in ops
               for a in n.args if isinstance(a, fx.Node) and a.op == "get_attr")
