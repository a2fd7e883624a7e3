"""Calibrate: run the model on calibration text and record the activation ranges quantization needs.

For every linear, the largest |x| its input takes (keyed by its weight's name, which survives the
later sharding passes); for every attention layer, the largest |k| and |v| written to the KV cache.
Static FP8 activation scales (W8A8), the NVFP4 activation global scale (W4A4) and the FP8 KV-cache
scales are these amaxes over the format's range. Only runs when the build asks for one of those;
weight-only quantization needs no calibration.
"""

from __future__ import annotations

import sys

import torch
import torch.fx as fx
from tqdm import tqdm

from llmc.passes.manager import BuildContext, example_step, register_pass

LINEAR = torch.ops.llmc.linear.default
ATTENTION = torch.ops.llmc.paged_attention.default


class _AmaxObserver(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, linear: dict[str, float], kv: dict[int, list[float]]):
        super().__init__(gm)
        self.linear, self.kv = linear, kv

    def run_node(self, node: fx.Node):
        if node.target == LINEAR and node.args[1].op == "get_attr":
            name = node.args[1].target
            self.linear[name] = max(self.linear.get(name, 0.0), _amax(self.env[node.args[0]]))
        elif node.target == ATTENTION:
            k, v, layer = self.env[node.args[1]], self.env[node.args[2]], node.args[4]
            old = self.kv.get(layer, [0.0, 0.0])
            self.kv[layer] = [max(old[0], _amax(k)), max(old[1], _amax(v))]
        return super().run_node(node)


def _amax(x: torch.Tensor) -> float:
    return x.detach().abs().max().float().item()


@register_pass("calibrate")
def calibrate(gm: fx.GraphModule, ctx: BuildContext):
    if not ctx.calibration_samples:
        return gm, {"samples": 0}
    linear: dict[str, float] = {}
    kv: dict[int, list[float]] = {}
    observer = _AmaxObserver(gm, linear, kv)
    with torch.no_grad():
        for ids in tqdm(ctx.calibration_samples, desc="[llmc] calibrating", unit="sample", file=sys.stderr, leave=False):
            observer.run(*example_step(gm, ctx, input_ids=ids).values())
    ctx.activation_amax = {"linear": linear, "kv": kv}
    return gm, {
        "samples": len(ctx.calibration_samples),
        "tokens": sum(map(len, ctx.calibration_samples)),
        "linears": len(linear),
        "max_linear_input_amax": round(max(linear.values(), default=0.0), 4),
        "max_kv_amax": round(max((max(a) for a in kv.values()), default=0.0), 4),
    }
