"""Quantize the KV cache: K and V stored as FP8 E4M3 with a per-layer scale for each (amax / 448 from
calibration), halving (bf16) or quartering (fp32) the cache's memory. The attention op divides by the
scale when it writes and multiplies when it reads (llmc/plugins/attention.py)."""

from __future__ import annotations

import torch
import torch.fx as fx

from llmc.passes.manager import BuildContext, PassError, register_pass
from llmc.plugins.quant_formats import E4M3_MAX
from llmc.weights import set_weight

ATTENTION = torch.ops.llmc.paged_attention.default
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}


@register_pass("quantize_kv_cache", lossy=True)
def quantize_kv_cache(gm: fx.GraphModule, ctx: BuildContext):
    if ctx.kv_cache_dtype is None:
        return gm, {"kv_cache_dtype": ctx.kv_cache["dtype"]}
    if ctx.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise PassError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {ctx.kv_cache_dtype!r}")
    amax = ctx.activation_amax.get("kv")
    if not amax:
        raise PassError("an FP8 KV cache needs calibration: the build gave no calibration samples")
    scales = []
    for node in gm.graph.nodes:
        if node.target != ATTENTION:
            continue
        layer = node.args[4]
        args = list(node.args[:11])
        for which, value in zip("kv", amax[layer]):
            name = f"kv_cache_{which}_scale_{layer}"
            scale = value / E4M3_MAX if value > 0 else 1.0  # a layer that never saw a nonzero K/V: any scale works
            set_weight(gm, name, torch.tensor(scale, dtype=torch.float32))
            with gm.graph.inserting_before(node):
                args.append(gm.graph.get_attr(name))
            scales.append(scale)
        node.args = tuple(args)
    dtype = KV_CACHE_DTYPES[ctx.kv_cache_dtype]
    ctx.kv_cache = {**ctx.kv_cache, "dtype": str(dtype).removeprefix("torch.")}
    return gm, {"kv_cache_dtype": ctx.kv_cache["dtype"], "layers": len(scales) // 2, "max_scale": round(max(scales), 6)}
