"""Attention: HF attention over a contiguous sequence -> llmc's paged-attention op (docs/design.md's step).

Every `aten.scaled_dot_product_attention` of the traced graph becomes `llmc.paged_attention`, layer i
reading and writing slice i of one KV-cache input. K and V are taken before HF's GQA expansion
(`repeat_kv`: unsqueeze -> expand -> reshape), so the cache holds each KV head once. The causal-mask
subgraph that fed SDPA is left dead and removed by the manager. RoPE stays where HF computes it,
on the new tokens' positions, before the cache write.

New program inputs: kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

import llmc.plugins.attention  # noqa: F401  (registers torch.ops.llmc.paged_attention)
from llmc.passes.manager import BuildContext, PassError, register_pass

aten = torch.ops.aten
STEP_INPUTS = ("kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def _before_repeat_kv(node: fx.Node) -> fx.Node:
    """x for reshape(expand(unsqueeze(x, 2))), the shape of HF's repeat_kv; else the node itself."""
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        expand = node.args[0]
        if expand.target == aten.expand.default and expand.args[0].target == aten.unsqueeze.default:
            unsqueeze = expand.args[0]
            if unsqueeze.args[1] == 2:
                return unsqueeze.args[0]
    return node


def sliding_windows(config, num_layers: int) -> list[int]:
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else 0 for t in layer_types[:num_layers]]
    return [window] * num_layers


def _add_inputs(graph: fx.Graph) -> dict[str, fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = {}
    with graph.inserting_after(last):
        for name in reversed(STEP_INPUTS):
            inputs[name] = graph.placeholder(name)
    return inputs


@register_pass("attention")
def attention(gm: fx.GraphModule, ctx: BuildContext):
    graph = gm.graph
    sdpas = [n for n in graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    if not sdpas:
        raise PassError(
            f"no attention found in the traced {ctx.hf_config.architectures or ctx.hf_config.model_type}: the attention "
            "pass rewrites torch's scaled_dot_product_attention, which HF emits for attn_implementation='sdpa'"
        )
    inputs = _add_inputs(graph)
    windows = sliding_windows(ctx.hf_config.get_text_config(), len(sdpas))
    kv_heads = set()
    for layer, sdpa in enumerate(sdpas):
        q, k, v = sdpa.args[:3]
        if sdpa.kwargs.get("dropout_p", 0.0) or (len(sdpa.args) > 4 and sdpa.args[4]):
            raise PassError(f"{sdpa.name} uses dropout; trace the model in eval mode")
        if not sdpa.kwargs.get("enable_gqa", False):
            k, v = _before_repeat_kv(k), _before_repeat_kv(v)
        q_shape, k_shape = q.meta["val"].shape, k.meta["val"].shape
        head_dim = int(q_shape[-1])
        scale = sdpa.kwargs.get("scale") or 1.0 / math.sqrt(head_dim)
        kv_heads.add(int(k_shape[1]))
        with graph.inserting_before(sdpa):
            paged = graph.call_function(
                torch.ops.llmc.paged_attention.default,
                (q, k, v, inputs["kv_cache"], layer, inputs["slot_mapping"], inputs["block_tables"],
                 inputs["seq_lens"], inputs["query_start_loc"], float(scale), int(windows[layer])),
            )
        paged.meta["val"] = sdpa.meta.get("val")
        sdpa.replace_all_uses_with(paged)
        graph.erase_node(sdpa)
    if len(kv_heads) != 1:
        raise PassError(f"layers have different numbers of KV heads {sorted(kv_heads)}; one KV cache cannot hold them")
    ctx.kv_cache = {
        "num_layers": len(sdpas), "num_kv_heads": kv_heads.pop(), "head_dim": head_dim, "dtype": str(ctx.dtype).removeprefix("torch.")
    }
    return gm, {**ctx.kv_cache, "sliding_window": max(windows)}
