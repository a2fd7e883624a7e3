"""Attention: transformers' attention, traced through llmc's AttentionInterface -> llmc's paged-attention op.

The frontend traces with attn_implementation="llmc" (llmc/frontend/attention_interface.py): each attention is
one `llmc_trace::attention(q, k, v, mask, scale, softcap, sinks)` node, k and v before GQA expansion, and each
mask transformers built is one `llmc_trace::causal_mask(sliding_window)` node. Each attention becomes
`llmc.paged_attention`, layer i reading and writing slice i of one KV-cache input, when its mask is proven to be
what the op computes (docs/design.md, "Attention"):

- a `causal_mask` node: causal attention, within its sliding window when it has one;
- an ALiBi bias (llmc/passes/alibi.py) over a causal mask: its per-head slopes become the op's `alibi_slopes`.

Anything else (a mask the model made itself, attention outside transformers' interface, SDPA called directly)
is a PassError naming the architecture and the feature. RoPE stays where HF computes it, on the new tokens'
positions, before the cache write.

New program inputs: kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import llmc.frontend.attention_interface  # noqa: F401  (registers torch.ops.llmc_trace)
import llmc.plugins.attention  # noqa: F401  (registers torch.ops.llmc.paged_attention)
from llmc.passes.alibi import alibi_slopes
from llmc.passes.manager import BuildContext, PassError, register_pass

aten = torch.ops.aten
TRACED_ATTENTION, CAUSAL_MASK = torch.ops.llmc_trace.attention.default, torch.ops.llmc_trace.causal_mask.default
UNRECOGNISED_MASK = torch.ops.llmc_trace.unrecognised_mask.default
STEP_INPUTS = ("kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")


def _add_inputs(graph: fx.Graph) -> dict[str, fx.Node]:
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = {}
    with graph.inserting_after(last):
        for name in reversed(STEP_INPUTS):
            inputs[name] = graph.placeholder(name)
    return inputs


def _mask(gm: fx.GraphModule, mask: fx.Node, ctx: BuildContext, layer: int) -> tuple[int, fx.Node | None]:
    """(sliding window, ALiBi slopes node or None) of the mask an attention received, or a PassError."""
    arch = ctx.architecture
    if mask.target == CAUSAL_MASK:
        return int(mask.args[1]), None
    encoder = getattr(ctx.hf_config.get_text_config(), "is_decoder", None) is False
    if mask.target == UNRECOGNISED_MASK and "bidirectional" in mask.args[1] and encoder:
        # BERT-style models pick their mask by `is_decoder`: as configured they are encoders, not causal LMs.
        raise PassError(f"{arch} is not a causal decoder as configured (is_decoder=False: its attention sees the whole "
                        "sequence); as a causal LM its config.json needs \"is_decoder\": true")
    if mask.target == UNRECOGNISED_MASK:
        raise PassError(f"{arch}: the attention mask of layer {layer} ({mask.args[1]}) is neither causal nor a causal "
                        "sliding window; llmc's attention implements only those")
    found = alibi_slopes(gm, mask)
    if found is not None:
        return found
    raise PassError(
        f"{arch}: the attention mask of layer {layer} is not transformers' causal mask but a tensor the model computes "
        f"itself ({mask.name}), and not an ALiBi bias llmc recognises; llmc cannot prove what that attention computes"
    )


def _interface_coverage(arch: str, calls: int, layers: int | None) -> str:
    """Why `calls` attentions through transformers' interface cannot be `layers` layers' KV-cached attentions."""
    if not calls:
        return (f"{arch}: none of its {layers or ''} layers computes attention through transformers' attention "
                "interface (each computes it in the model's own code), which llmc does not lower").replace("  ", " ")
    if calls > layers:
        return (f"{arch}: its {layers} layers call transformers' attention interface {calls} times (a layer attends more "
                "than once, or runs more than once); llmc's KV cache holds one attention per layer")
    return (f"{arch}: only {calls} of its {layers} layers compute attention through transformers' attention interface; "
            "the others compute it in the model's own code, which llmc does not lower")


@register_pass("attention")
def attention(gm: fx.GraphModule, ctx: BuildContext):
    graph, arch = gm.graph, ctx.architecture
    sdpas = [n for n in graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    if sdpas:
        raise PassError(f"{arch} calls scaled_dot_product_attention itself ({sdpas[0].name}), not through transformers' "
                        "attention interface; llmc cannot prove which mask it applies")
    traced = [n for n in graph.nodes if n.target == TRACED_ATTENTION]
    layers = getattr(ctx.hf_config.get_text_config(), "num_hidden_layers", None)
    if not traced or (layers is not None and len(traced) != layers):
        raise PassError(_interface_coverage(arch, len(traced), layers))
    inputs = _add_inputs(graph)
    kv_heads, head_dims, windows, features = set(), set(), [], set()
    for layer, node in enumerate(traced):
        q, k, v, mask, scale, softcap, sinks = node.args
        window, slopes = _mask(gm, mask, ctx, layer)
        windows.append(window)
        dk, dv = int(k.meta["val"].shape[-1]), int(v.meta["val"].shape[-1])
        kv_heads.add(int(k.meta["val"].shape[1]))
        head_dims.add(max(dk, dv))
        extra = {"alibi_slopes": slopes, "softcap": float(softcap), "sinks": sinks}
        extra = {name: value for name, value in extra.items() if value}
        features |= set(extra) | ({"k_v_head_dims"} if dk != dv else set())
        with graph.inserting_before(node):
            paged = graph.call_function(
                torch.ops.llmc.paged_attention.default,
                (q, k, v, inputs["kv_cache"], layer, inputs["slot_mapping"], inputs["block_tables"],
                 inputs["seq_lens"], inputs["query_start_loc"], float(scale), window),
                extra,
            )
        paged.meta["val"] = llmc.plugins.attention.attention_output(node.meta["val"])
        paged.meta["head_dims"] = (dk, dv)  # K's and V's: what backends that cannot pad (ONNX GQA) check
        node.replace_all_uses_with(paged)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    left = [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("llmc_trace.")]
    if left:
        raise PassError(f"{arch}: {left[0].name} ({left[0].target}) is used outside attention; llmc cannot lower it")
    if len(kv_heads) != 1 or len(head_dims) != 1:
        raise PassError(f"{arch}: layers have different KV heads {sorted(kv_heads)} or head dims {sorted(head_dims)}; "
                        "one KV cache cannot hold them")
    ctx.kv_cache = {
        "num_layers": len(traced), "num_kv_heads": kv_heads.pop(), "head_dim": head_dims.pop(),
        "dtype": str(ctx.dtype).removeprefix("torch."),
    }
    return gm, {**ctx.kv_cache, "sliding_window": max(windows), "features": sorted(features)}
