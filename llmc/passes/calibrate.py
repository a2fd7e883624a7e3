"""Calibrate: run the model on calibration text and record the activation ranges quantization needs.

For every linear, the largest |x| its input takes (keyed by its weight's name, which survives the
later sharding passes); for every attention layer, the largest |k| and |v| written to the KV cache.
Static FP8 activation scales (W8A8), the NVFP4 activation global scale (W4A4) and the FP8 KV-cache
scales are these amaxes over the format's range. Only runs when the build asks for one of those, or
for a `--quant-algo` that reads the inputs (llmc/passes/quant_algos): then each distinct linear input
also gets the statistics the algorithm needs (`STATISTICS`), shared by the linears that read it: per
input channel amax and mean |x|, the Hessian X^T X, or a subsample of its rows (one every `stride`).
"""

from __future__ import annotations

import sys

import torch
import torch.fx as fx
from tqdm import tqdm

from llmc.passes.manager import BuildContext, example_step, register_pass
from llmc.passes.quant_algos import STATISTICS

LINEAR = torch.ops.llmc.linear.default
ATTENTION = torch.ops.llmc.paged_attention.default


INPUT_ROWS = 512  # rows of each linear input kept for the algorithms that search on them (awq)


class _AmaxObserver(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, linear: dict[str, float], kv: dict[int, list[float]], inputs: "_InputStatistics | None"):
        super().__init__(gm)
        self.linear, self.kv, self.inputs = linear, kv, inputs

    def run_node(self, node: fx.Node):
        if node.target == LINEAR and node.args[1].op == "get_attr":
            name = node.args[1].target
            self.linear[name] = max(self.linear.get(name, 0.0), _amax(self.env[node.args[0]]))
            if self.inputs is not None:
                self.inputs.add(name, node.args[0], self.env[node.args[0]])
        elif node.target == ATTENTION:
            k, v, layer = self.env[node.args[1]], self.env[node.args[2]], node.args[4]
            old = self.kv.get(layer, [0.0, 0.0])
            self.kv[layer] = [max(old[0], _amax(k)), max(old[1], _amax(v))]
        return super().run_node(node)


class _InputStatistics:
    """Statistics of each distinct linear input, accumulated over the samples; linears reading one input share them."""

    def __init__(self, kinds: tuple[str, ...], stride: int):
        self.kinds, self.stride = kinds, stride
        self.by_input: dict[fx.Node, dict] = {}
        self.by_weight: dict[str, dict] = {}
        self.seen: set[fx.Node] = set()  # inputs recorded in the current sample

    def add(self, weight: str, node: fx.Node, x: torch.Tensor) -> None:
        stats = self.by_weight[weight] = self.by_input.setdefault(node, {"count": 0, "rows": []})
        if node in self.seen:
            return
        self.seen.add(node)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        stats["count"] += x.shape[0]
        if "channel_amax" in self.kinds:
            stats["channel_amax"] = torch.maximum(stats.get("channel_amax", torch.zeros(x.shape[1])), x.abs().amax(dim=0))
        if "channel_mean_abs" in self.kinds:
            stats["abs_sum"] = stats.get("abs_sum", 0) + x.abs().sum(dim=0)
        if "hessian" in self.kinds:
            stats["hessian"] = stats.get("hessian", 0) + x.T @ x
        if "inputs" in self.kinds:
            stats["rows"].append(x[:: self.stride].clone())

    def result(self) -> dict[str, dict]:
        for stats in self.by_input.values():
            if "abs_sum" in stats:
                stats["channel_mean_abs"] = stats.pop("abs_sum") / max(stats["count"], 1)
            rows = stats.pop("rows")
            if rows:
                stats["inputs"] = torch.cat(rows)[:INPUT_ROWS]
        return self.by_weight


def _amax(x: torch.Tensor) -> float:
    return x.detach().abs().max().float().item()


@register_pass("calibrate")
def calibrate(gm: fx.GraphModule, ctx: BuildContext):
    if not ctx.calibration_samples:
        return gm, {"samples": 0}
    linear: dict[str, float] = {}
    kv: dict[int, list[float]] = {}
    kinds = STATISTICS.get(ctx.quant_algo, ())
    tokens = sum(map(len, ctx.calibration_samples))
    inputs = _InputStatistics(kinds, stride=max(1, tokens // INPUT_ROWS)) if kinds else None
    observer = _AmaxObserver(gm, linear, kv, inputs)
    with torch.no_grad():
        for ids in tqdm(ctx.calibration_samples, desc="[llmc] calibrating", unit="sample", file=sys.stderr, leave=False):
            if inputs is not None:
                inputs.seen.clear()
            observer.run(*example_step(gm, ctx, input_ids=ids).values())
    ctx.activation_amax = {"linear": linear, "kv": kv}
    ctx.activation_stats = inputs.result() if inputs is not None else {}
    return gm, {
        "samples": len(ctx.calibration_samples),
        "tokens": tokens,
        **({"statistics": list(kinds)} if kinds else {}),
        "linears": len(linear),
        "max_linear_input_amax": round(max(linear.values(), default=0.0), 4),
        "max_kv_amax": round(max((max(a) for a in kv.values()), default=0.0), 4),
    }
