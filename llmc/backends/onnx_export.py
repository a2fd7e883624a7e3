"""A rank's graph as an ONNX program (build time only; the runtime never imports this module).

The ONNX program computes docs/design.md's step contract with one cache block per sequence, the block
being a contiguous row of max_seq_len tokens: a call takes B sequences (rows of the cache) with the
same number S of new tokens each, flat as `input_ids[1, B*S]`, and per layer the rows' caches
`past_key_i`/`past_value_i` [B, kv_heads, max_seq_len, head_dim], which it returns updated as
`present_key_i`/`present_value_i` (the runner binds both to the same memory). `seqlens_k[B]` is
each sequence's context length minus one once the new tokens are in (ORT's convention) and
`total_sequence_length` the largest context length.

Two forms of the same program:
- "onnxruntime": attention is com.microsoft GroupQueryAttention, which updates the cache in place
  when past and present share a buffer; RMSNorm is ONNX RMSNormalization.
- "standard": only standard ONNX ops (what TensorRT's parser takes): the new K/V scattered into the
  cache rows (ScatterElements), then a masked softmax over them.

llmc's ops reach ONNX in one of two ways: a lowering in LOWERINGS (native), or, for the others, the
op's plain-torch reference traced by torch.onnx into standard ops (fallback). Tensor-parallel
collectives have no ONNX op (ORT's CPU build has none): a rank's program is split at them into
consecutive segments, one ONNX model each, and the runner does each collective between two segments
with torch.distributed. The rank's record lists the segments and collectives in order ("program").
"""

from __future__ import annotations

import logging
import operator
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import onnx
import onnxscript
import onnxscript.optimizer
import torch
import torch.fx as fx
from onnxscript import ir
from onnxscript import opset23 as op
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from tqdm import tqdm

import llmc.plugins  # noqa: F401  (the ops the rank graph calls)
from llmc.backends.onnx_program import COLLECTIVES, MODEL
from llmc.plugins import activations, attention, collectives, norms, rotary
from llmc.plugins.quant_formats import E2M1_BY_CODE, E2M1_MAX, E2M1_TIES_DOWN, E2M1_TIES_UP, NVFP4_BLOCK

OPSET = 23
# torch.onnx logs, at every export, each torchvision op it skips (torchvision is not installed): noise here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
QDQ = ("QuantizeLinear", "DequantizeLinear")
FORMS = ("onnxruntime", "standard")
# The dynamic dims of a call, and their sizes in the example call that is traced: two sequences with three new
# tokens each, the logits of two of them.
NUM_TOKENS, NUM_LOGITS, BATCH = (torch.export.Dim(name, min=1) for name in ("num_tokens", "num_logits", "batch"))
EXAMPLE_SIZES = {NUM_TOKENS: 6, NUM_LOGITS: 2, BATCH: 2}

# The attention of one call, functional: (out [1,H,T,D], present_key, present_value). The head counts are q's and k's dim 1.
torch.library.define(
    "llmc_onnx::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor past_key, Tensor past_value, Tensor seqlens_k, Tensor total_sequence_length, "
    "float scale, int sliding_window, Tensor? alibi_slopes=None, float softcap=0.0, Tensor? sinks=None) -> (Tensor, Tensor, Tensor)",
)
torch.library.register_fake(
    "llmc_onnx::attention",
    lambda q, k, v, past_key, past_value, *_, **__: (
        q.new_empty((*q.shape[:-1], v.shape[-1])), torch.empty_like(past_key), torch.empty_like(past_value)
    ),
)


def _register_msft_schema() -> None:
    """onnxscript builds a node from its op's schema; ORT's contrib ops have none in onnx's registry.
    Only the inputs and outputs used here are declared (outputs after them are optional and unused)."""
    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        return
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    schema = onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T", param_option=opt), P("value", "T", param_option=opt),
                P("past_key", "T", param_option=opt), P("past_value", "T", param_option=opt),
                P("seqlens_k", "M"), P("total_sequence_length", "M")],
        outputs=[P("output", "T"), P("present_key", "T", param_option=opt), P("present_value", "T", param_option=opt)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[A("num_heads", onnx.defs.OpSchema.AttrType.INT, ""), A("kv_num_heads", onnx.defs.OpSchema.AttrType.INT, ""),
                    A("scale", onnx.defs.OpSchema.AttrType.FLOAT, ""),
                    A("local_window_size", onnx.defs.OpSchema.AttrType.INT, ""),
                    A("softcap", onnx.defs.OpSchema.AttrType.FLOAT, "")],
    )
    onnx.defs.register_schema(schema)


_register_msft_schema()
msft = onnxscript.values.Opset("com.microsoft", 1)


def _flat_to_batch(x, batch, heads: int, head_dim: int):
    """[1, heads, B*S, D] -> [B, S, heads*D]."""
    x = op.Transpose(x, perm=[0, 2, 1, 3])
    return op.Reshape(x, op.Concat(batch, op.Constant(value_ints=[-1, heads * head_dim]), axis=0))


def _batch_to_flat(x, heads: int, head_dim: int):
    """[B, S, heads*D] -> [1, heads, B*S, D]."""
    x = op.Reshape(x, op.Constant(value_ints=[1, -1, heads, head_dim]))
    return op.Transpose(x, perm=[0, 2, 1, 3])


def attention_gqa(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, scale, sliding_window,
                  alibi_slopes=None, softcap=0.0, sinks=None):
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    batch = op.Shape(seqlens_k)
    # Soft-capping is ORT's softcap. ALiBi, sinks and K/V of different head dims: step_program refuses them here.
    out, present_key, present_value = msft.GroupQueryAttention(
        _flat_to_batch(q, batch, num_heads, head_dim), _flat_to_batch(k, batch, num_kv_heads, head_dim),
        _flat_to_batch(v, batch, num_kv_heads, head_dim), past_key, past_value, seqlens_k, total_sequence_length,
        num_heads=num_heads, kv_num_heads=num_kv_heads, scale=scale,
        # ORT's window, like llmc's (HF's), counts the query itself (checked on Mistral).
        local_window_size=sliding_window if sliding_window > 0 else -1, softcap=float(softcap),
    )
    return _batch_to_flat(out, num_heads, head_dim), present_key, present_value


def attention_standard(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, scale, sliding_window,
                       alibi_slopes=None, softcap=0.0, sinks=None):
    num_heads, num_kv_heads, head_dim, v_head_dim = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    cache_dim = max(head_dim, v_head_dim)
    batch = op.Shape(seqlens_k)
    # [1, heads, B*S, D] -> [B, heads, S, D]
    to_batch = lambda x, h, d: op.Transpose(  # noqa: E731
        op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Concat(batch, op.Constant(value_ints=[-1, h, d]), axis=0)),
        perm=[0, 2, 1, 3],
    )
    # K and V of different head dims: zero-padded to the cache's (the larger), read back at their own.
    pad = lambda x, d: x if d == cache_dim else op.Pad(x, op.Constant(value_ints=[0, 0, 0, 0, 0, 0, 0, cache_dim - d]))  # noqa: E731
    qb = to_batch(q, num_heads, head_dim)
    kb, vb = pad(to_batch(k, num_kv_heads, head_dim), head_dim), pad(to_batch(v, num_kv_heads, v_head_dim), v_head_dim)
    new = op.Shape(qb, start=2, end=3)  # S
    # Positions of the new tokens: context length - S + [0, S), per sequence: [B, S].
    first = op.Sub(op.Add(op.Cast(seqlens_k, to=onnx.TensorProto.INT64), op.Constant(value_int=1)), new)
    positions = op.Add(op.Unsqueeze(first, op.Constant(value_ints=[1])),
                       op.Range(op.Constant(value_int=0), op.Squeeze(new), op.Constant(value_int=1)))
    index = op.Expand(op.Unsqueeze(positions, op.Constant(value_ints=[1, 3])), op.Shape(kb))
    present_key = op.ScatterElements(past_key, index, kb, axis=2)
    present_value = op.ScatterElements(past_value, index, vb, axis=2)
    # GQA: each KV head serves num_heads / num_kv_heads query heads.
    group = num_heads // num_kv_heads
    cache_len = op.Shape(past_key, start=2, end=3)
    expanded = op.Concat(batch, op.Constant(value_ints=[num_kv_heads, group]), cache_len, op.Constant(value_ints=[cache_dim]), axis=0)
    merged = op.Concat(batch, op.Constant(value_ints=[num_heads]), cache_len, op.Constant(value_ints=[cache_dim]), axis=0)
    repeat = lambda x: op.Reshape(op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])), expanded), merged)  # noqa: E731
    keys, values = repeat(present_key), repeat(present_value)
    if head_dim != cache_dim:
        keys = op.Slice(keys, op.Constant(value_ints=[0]), op.Constant(value_ints=[head_dim]), op.Constant(value_ints=[3]))
    if v_head_dim != cache_dim:
        values = op.Slice(values, op.Constant(value_ints=[0]), op.Constant(value_ints=[v_head_dim]), op.Constant(value_ints=[3]))
    scores = op.Mul(op.MatMul(qb, op.Transpose(keys, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), qb))
    if softcap > 0:
        cap = op.CastLike(op.Constant(value_float=softcap), scores)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    # Causal over the row: key position <= query position (and within the window).
    key_pos = op.Range(op.Constant(value_int=0), op.Squeeze(cache_len), op.Constant(value_int=1))
    query_pos = op.Unsqueeze(positions, op.Constant(value_ints=[1, 3]))  # [B, 1, S, 1]
    if alibi_slopes is not None:  # slope * (key position - query position), per head
        slopes = op.Reshape(op.CastLike(alibi_slopes, scores), op.Constant(value_ints=[1, -1, 1, 1]))
        scores = op.Add(scores, op.Mul(slopes, op.CastLike(op.Sub(key_pos, query_pos), scores)))
    allowed = op.LessOrEqual(key_pos, query_pos)
    if sliding_window > 0:
        allowed = op.And(allowed, op.Greater(key_pos, op.Sub(query_pos, op.Constant(value_int=sliding_window))))
    lowest = op.CastLike(op.Constant(value_float=float(torch.finfo(torch.float16).min)), scores)
    scores = op.Where(allowed, scores, lowest)
    if sinks is None:
        probs = op.Softmax(scores, axis=-1)
    else:  # one more logit per head in the softmax, its probability dropped
        sink = op.Expand(op.Reshape(op.CastLike(sinks, scores), op.Constant(value_ints=[1, -1, 1, 1])),
                         op.Concat(op.Shape(scores, end=3), op.Constant(value_ints=[1]), axis=0))
        probs = op.Softmax(op.Concat(scores, sink, axis=-1), axis=-1)
        probs = op.Slice(probs, op.Constant(value_ints=[0]), cache_len,
                         op.Constant(value_ints=[3]))
    out = op.MatMul(probs, values)  # [B, H, S, dv]
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[1, -1, num_heads, v_head_dim]))
    return op.Transpose(out, perm=[0, 2, 1, 3]), present_key, present_value


def lower_linear(x, w, bias=None):
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def lower_rms_norm(x, w, eps):
    return op.RMSNormalization(x, w, epsilon=eps, axis=-1, stash_type=1)


def lower_add_rms_norm(x, residual, w, eps):
    h = op.Add(x, residual)
    return op.RMSNormalization(h, w, epsilon=eps, axis=-1, stash_type=1), h


def lower_fp8_linear(x, weight, weight_scale, input_scale=None, bias=None):
    """llmc::fp8_linear: the FLOAT8E4M3FN weight stays an initializer, dequantized per output channel;
    a static input scale quantizes the activation to FP8 and back (Q/DQ, as TensorRT fuses them)."""
    w = op.DequantizeLinear(weight, weight_scale, axis=0)
    if input_scale is not None:
        scale = op.CastLike(input_scale, x)
        x = op.DequantizeLinear(op.QuantizeLinear(x, scale, output_dtype=onnx.TensorProto.FLOAT8E4M3FN), scale)
    return lower_linear(x, op.CastLike(w, x), bias)


def lower_fp8_embedding(weight, weight_scale, ids, dtype):
    """llmc::fp8_embedding: the FLOAT8E4M3FN table stays an initializer, dequantized per row (GatherND
    takes no FP8), then the rows gathered."""
    return op.Cast(op.Gather(op.DequantizeLinear(weight, weight_scale, axis=0), ids, axis=0), to=dtype)


def _ints(*values):
    return op.Constant(value_ints=list(values))


def _floats(*values):
    return op.Constant(value_floats=list(values))


# A packed byte's E2M1 values, [256, 2]: its low nibble's (element 2j) and its high nibble's (2j + 1).
FP4_PAIRS = onnx.helper.make_tensor("fp4_pairs", onnx.TensorProto.FLOAT, [256, 2],
                                    [E2M1_BY_CODE[code] for byte in range(256) for code in (byte % 16, byte // 16)])


def _blocks_shape(x):
    """The shape [..., -1, 16] that splits x's last dimension into NVFP4 blocks."""
    return op.Concat(op.Shape(x, end=-1), _ints(-1, NVFP4_BLOCK), axis=0)


def _e2m1_decode(codes):
    return op.Gather(_floats(*E2M1_BY_CODE), codes, axis=0)


def _e2m1_encode(x):
    """Nearest E2M1 codes (int64) of float32 x, rounded as quant_formats.fp4_e2m1_encode: a magnitude's
    code counts the midpoints below it (> where a tie rounds down to the even code, >= where it rounds up);
    bit 3 is the sign."""
    a = op.Unsqueeze(op.Abs(x), _ints(-1))
    above = op.Concat(op.Greater(a, _floats(*E2M1_TIES_DOWN)), op.GreaterOrEqual(a, _floats(*E2M1_TIES_UP)), axis=-1)
    magnitude = op.ReduceSum(op.Cast(above, to=onnx.TensorProto.INT64), _ints(-1), keepdims=0)
    negative = op.Less(op.Reciprocal(x), _floats(0.0))  # the sign bit: also set for -0.0, as the reference keeps it
    return op.Add(magnitude, op.Mul(op.Cast(negative, to=onnx.TensorProto.INT64), _ints(8)))


def _dequantize_nvfp4(packed, scale):
    """Packed E2M1 bytes [..., K/2] (uint8, or their values as floats) times their blocks' float32 scales
    [..., K/16] -> [..., K], as quant_formats.dequantize_nvfp4. A byte indexes a table of its two values:
    one Gather, which ONNX Runtime runs in half the time of splitting the nibbles (Mod, Div) and decoding
    each (measured); TensorRT's parser takes no bitwise ops."""
    pairs = op.Gather(op.Constant(value=FP4_PAIRS), op.Cast(packed, to=onnx.TensorProto.INT32), axis=0)  # [..., K/2, 2]
    values = op.Mul(op.Reshape(pairs, _blocks_shape(packed)), op.Unsqueeze(scale, _ints(-1)))
    return op.Reshape(values, op.Concat(op.Shape(packed, end=-1), _ints(-1), axis=0))


def fake_quantize_nvfp4(x, global_scale):
    """quant_formats.fake_quantize_nvfp4_activation, bit for bit in fp32: per block of 16, amax / 6 quantized
    to E4M3 with the global scale is the block's scale; x / scale rounded to E2M1, times the scale."""
    blocks = op.Reshape(op.Cast(x, to=onnx.TensorProto.FLOAT), _blocks_shape(x))
    amax = op.ReduceMax(op.Abs(blocks), _ints(-1), keepdims=1)
    block_scale = op.QuantizeLinear(op.Div(amax, _floats(E2M1_MAX)), global_scale,
                                    output_dtype=onnx.TensorProto.FLOAT8E4M3FN)
    scale = op.DequantizeLinear(block_scale, global_scale)
    positive = op.Where(op.Greater(scale, _floats(0.0)), scale, _floats(1.0))  # an all-zero block divides by 1
    values = op.Mul(_e2m1_decode(_e2m1_encode(op.Div(blocks, positive))), scale)
    return op.CastLike(op.Reshape(values, op.Shape(x)), x)


def lower_nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale=None, bias=None):
    """llmc::nvfp4_linear: the packed weight stays a UINT8 initializer and its block scales a FLOAT8E4M3FN
    one, decoded by standard ops; W4A4 fake-quantizes the input per block first."""
    if input_global_scale is not None:
        x = fake_quantize_nvfp4(x, input_global_scale)
    w = _dequantize_nvfp4(weight, op.DequantizeLinear(weight_scale, weight_global_scale))
    return lower_linear(x, op.CastLike(w, x), bias)


def lower_nvfp4_linear_kept_packed(x, weight, weight_scale, weight_global_scale, input_global_scale=None, bias=None):
    """lower_nvfp4_linear for ONNX Runtime, which folds constant subgraphs as it loads a model (here into
    decoded weights: twice the fp32 engine's memory, measured) but never a DequantizeLinear: so the packed
    bytes pass through one (scale 1 gives their values) and stay packed, decoded at each call. TensorRT's
    parser takes no UINT8 DequantizeLinear."""
    weight = op.DequantizeLinear(weight, op.Constant(value_float=1.0))
    return lower_nvfp4_linear(x, weight, weight_scale, weight_global_scale, input_global_scale, bias)


def lower_nvfp4_embedding(weight, weight_scale, weight_global_scale, ids, dtype):
    """llmc::nvfp4_embedding: the packed rows and their block scales gathered, then only they decoded
    (Gather takes no FP8, so the scale table, 1/8 of the packed one, is dequantized first)."""
    scales = op.Gather(op.DequantizeLinear(weight_scale, weight_global_scale), ids, axis=0)
    return op.Cast(_dequantize_nvfp4(op.Gather(weight, ids, axis=0), scales), to=dtype)


# llmc op -> its ONNX lowering, per form. Ops not listed (and present in a graph) fall back to their
# plain-torch reference.
LOWERINGS = {
    "onnxruntime": {
        "llmc_onnx::attention": attention_gqa,
        "llmc::linear": lower_linear,
        "llmc::rms_norm": lower_rms_norm,
        "llmc::add_rms_norm": lower_add_rms_norm,
        "llmc::fp8_linear": lower_fp8_linear,
        "llmc::fp8_embedding": lower_fp8_embedding,
        "llmc::nvfp4_linear": lower_nvfp4_linear_kept_packed,
        "llmc::nvfp4_embedding": lower_nvfp4_embedding,
    },
    "standard": {
        "llmc_onnx::attention": attention_standard,
        "llmc::linear": lower_linear,
        "llmc::fp8_linear": lower_fp8_linear,
        "llmc::fp8_embedding": lower_fp8_embedding,
        "llmc::nvfp4_linear": lower_nvfp4_linear,
        "llmc::nvfp4_embedding": lower_nvfp4_embedding,
    },
}
ATTENTION = {"onnxruntime": "native (com.microsoft::GroupQueryAttention)", "standard": "native (ScatterElements, masked Softmax)"}
REFERENCES = {
    "llmc::linear": torch.nn.functional.linear,
    "llmc::rms_norm": norms.rms_norm,
    "llmc::add_rms_norm": norms.add_rms_norm,
    "llmc::add_layer_norm": norms.add_layer_norm,
    "llmc::gated_activation": activations.gated_activation,
    "llmc::vocab_embedding": collectives.vocab_embedding,
    "llmc::rotary_embedding": rotary.rotary_embedding,
}
BETWEEN_SEGMENTS = "between segments (torch.distributed)"


class OnnxExportError(ValueError):
    """A rank graph the ONNX form cannot express; the message names the op and what to build instead."""


class Segment(NamedTuple):
    """The part of a rank's step program between two collectives, and the names of the values it returns."""

    module: fx.GraphModule
    outputs: list[str]


def _op_name(node: fx.Node) -> str | None:
    return node.target.name().replace(".default", "") if isinstance(node.target, torch._ops.OpOverload) else None


def step_program(gm: fx.GraphModule, ctx, form: str) -> tuple[fx.GraphModule, dict]:
    """The rank graph with paged attention replaced by llmc_onnx::attention over per-layer cache rows, and llmc ops
    without a lowering in `form` replaced by their references, each value's shape in its meta["val"]. Also returns
    how each llmc op was lowered: {op: "native ..." | "fallback" | BETWEEN_SEGMENTS} (fallback: its plain-torch
    reference, traced)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # a copy: the backend's rewrite leaves the rank graph as it is
    gm = fx.GraphModule(gm, graph)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    paged = [n for n in graph.nodes if _op_name(n) == "llmc::paged_attention"]
    if not paged:
        raise OnnxExportError("the rank graph has no llmc::paged_attention; it was not built by llmc's passes")
    # The passes leave new nodes without shapes: they are propagated again at the end, in the mode the graph was
    # traced in, so that they stay symbolic in the step's token and logits counts.
    fake_mode = placeholders["input_ids"].meta["val"].fake_mode
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def new_input(name: str, example: torch.Tensor) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        anchor.meta["val"] = fake_mode.from_tensor(example, static_shapes=True)
        return anchor

    batch, kv = EXAMPLE_SIZES[BATCH], ctx.kv_cache
    seqlens_k = new_input("seqlens_k", torch.zeros(batch, dtype=torch.int32))
    total = new_input("total_sequence_length", torch.tensor(0, dtype=torch.int32))
    rows = torch.zeros(batch, kv["num_kv_heads"], ctx.max_seq_len, kv["head_dim"], dtype=ctx.dtype)
    presents = []
    lowered = {"llmc::paged_attention": ATTENTION[form]}
    for node in paged:
        q, k, v, _, layer, _, _, _, _, scale, window, *scales = node.args
        if any(s is not None for s in scales) or any(node.kwargs.get(s) is not None for s in ("k_scale", "v_scale")):
            raise OnnxExportError("an FP8 KV cache (k_scale/v_scale) has no ONNX lowering yet; build without a quantized KV cache")
        features = {name: node.kwargs[name] for name in ("alibi_slopes", "softcap", "sinks") if node.kwargs.get(name)}
        dk, dv = node.meta.get("head_dims", (kv["head_dim"], kv["head_dim"]))  # set by the attention pass
        missing = [what for what, used in (("ALiBi", "alibi_slopes" in features), ("K and V of different head dims", dk != dv),
                                           ("attention sinks", "sinks" in features)) if used]
        if form == "onnxruntime" and missing:  # sinks: ORT's head_sink, not yet checked against the torch backend
            raise OnnxExportError(f"{missing[0]} has no onnxruntime GroupQueryAttention form; build this model with the torch backend")
        past = [new_input(f"past_{kind}_{layer}", rows) for kind in ("key", "value")]
        with graph.inserting_before(node):
            if node.kwargs.get("cos") is not None:  # RoPE folded into the op: applied before it, by its reference
                rope = (node.kwargs["cos"], node.kwargs["sin"], node.kwargs.get("rotary_interleaved", False))
                q, k = (graph.call_function(attention.apply_rope, (x, *rope)) for x in (q, k))
                lowered["llmc::paged_attention's RoPE"] = "fallback"
            attn = graph.call_function(
                torch.ops.llmc_onnx.attention.default, (q, k, v, *past, seqlens_k, total, float(scale), int(window)), features
            )
            out = graph.call_function(operator.getitem, (attn, 0))
            presents += [graph.create_node("call_function", operator.getitem, (attn, i), name=f"present_{kind}_{layer}")
                         for i, kind in ((1, "key"), (2, "value"))]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    for name in ("kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        if name in placeholders:
            if placeholders[name].users:
                raise OnnxExportError(f"the rank graph reads {name} outside attention; the ONNX backend cannot lower it")
            graph.erase_node(placeholders[name])
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    results = tuple(results) if isinstance(results, (tuple, list)) else (results,)
    output.args = (results + tuple(presents),)

    for node in list(graph.nodes):
        name = _op_name(node)
        if name is None or not name.startswith("llmc::"):
            continue
        if name in COLLECTIVES:
            lowered[name] = BETWEEN_SEGMENTS
        elif name in LOWERINGS[form]:
            lowered[name] = "native"
        elif name in REFERENCES:
            node.target = REFERENCES[name]
            lowered[name] = "fallback"
        else:
            raise OnnxExportError(f"{name} has no ONNX lowering and no plain-torch reference to fall back to")
    graph.lint()
    gm.recompile()
    with fake_mode:  # the traced inputs' shapes, on the weights' device (the model was traced on meta)
        inputs = [torch.empty(n.meta["val"].shape, dtype=n.meta["val"].dtype) for n in graph.nodes if n.op == "placeholder"]
    FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
    return gm, {"lowered": lowered}


def split_at_collectives(step: fx.GraphModule, output_names: list[str]) -> list[Segment | dict]:
    """The step program as consecutive segments with the collectives between them, in order (a collective as its
    record: {collective, input, output, args}). Values keep their node's name, the step's outputs `output_names`.

    A segment takes the step inputs it reads and the values it reads from earlier segments and collectives; it
    returns the values that later segments, a collective or the step's output read. A size (SymInt) is recomputed
    in each segment that reads it: ONNX models pass only tensors."""
    results = next(n for n in step.graph.nodes if n.op == "output").args[0]
    names = dict(zip(results, output_names))
    name = lambda node: names.get(node, node.name)  # noqa: E731
    runs: list[list[fx.Node]] = [[]]  # the nodes before the first collective, between each two, after the last
    between: list[fx.Node] = []
    for node in step.graph.nodes:
        if _op_name(node) in COLLECTIVES:
            between.append(node)
            runs.append([])
        elif node.op == "call_function":
            runs[-1].append(node)
    read_later = set(results) | {c.args[0] for c in between}  # each segment's graph adds what it reads from earlier ones
    graphs = [_segment_graph(run, name, read_later) for run in runs]
    program: list[Segment | dict] = []
    for run, (graph, env), collective in zip(runs, graphs, [*between, None]):
        returned = [n for n in run if n in read_later]
        if returned:
            graph.output(tuple(env[n] for n in returned))
            program.append(Segment(fx.GraphModule(step, graph), [name(n) for n in returned]))
        if collective is not None:
            schema = collective.target._schema.arguments
            program.append({"collective": _op_name(collective), "input": name(collective.args[0]), "output": name(collective),
                            "args": {a.name: value for a, value in zip(schema[1:], collective.args[1:])}})
    return program


def _segment_graph(run: list[fx.Node], name, read_later: set[fx.Node]) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A graph computing `run` (no output yet), and the map from the step's nodes to its own. What it reads from
    earlier segments or collectives becomes an input (and is added to read_later)."""
    graph, env, own = fx.Graph(), {}, set(run)

    def value(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_function" and (node in own or not isinstance(node.meta["val"], torch.Tensor)):
            env[node] = graph.node_copy(node, value)  # this segment's node, or a size from an earlier one (recomputed)
        else:  # a step input, or a tensor from an earlier segment or collective
            env[node] = graph.placeholder(node.target if node.op == "placeholder" else name(node))
            env[node].meta["val"] = node.meta["val"]
            if node.op != "placeholder":
                read_later.add(node)
        return env[node]

    for node in run:
        value(node)
    return graph, env


def _dynamic_sizes(step: fx.GraphModule) -> dict[str, torch.export.Dim]:
    """The step's symbolic sizes by name: its token count (input_ids' dim 1) and logits count (logits_indices')."""
    inputs = {n.target: n.meta["val"] for n in step.graph.nodes if n.op == "placeholder"}
    sizes = {str(inputs["input_ids"].shape[1]): NUM_TOKENS}
    if "logits_indices" in inputs:
        sizes[str(inputs["logits_indices"].shape[0])] = NUM_LOGITS
    return sizes


def _example_inputs(gm: fx.GraphModule, sizes: dict[str, torch.export.Dim]):
    """Zeros of each input's shape at the example sizes, for tracing; and each input's dynamic dims."""
    example, dims = {}, {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta["val"]
        if node.target == "seqlens_k" or node.target.startswith("past_"):
            axes = {0: BATCH}
        else:
            axes = {i: sizes.get(str(d)) for i, d in enumerate(val.shape) if not isinstance(d, int)}
            if None in axes.values():
                raise OnnxExportError(f"{node.target} has a dim {list(val.shape)} that is neither the step's token count nor "
                                      "its logits count: the ONNX backend cannot pass it between segments")
        shape = [EXAMPLE_SIZES[axes[i]] if i in axes else d for i, d in enumerate(val.shape)]
        example[node.target], dims[node.target] = torch.zeros(shape, dtype=val.dtype), axes or None
    return example, dims


def _foldable(node: ir.Node) -> bool | None:
    """False for nodes whose folding would turn packed weights into float initializers: FP8's Q/DQ and
    the ops reading FP4's packed bytes (uint8); None leaves the rest to the folder's own rules."""
    if node.op_type in QDQ or any(v is not None and v.dtype == ir.DataType.UINT8 for v in node.inputs):
        return False
    return None


def export_rank(gm: fx.GraphModule, rank_dir: Path, ctx, form: str) -> dict:
    """Write `gm` (a rank graph) into rank_dir: model.onnx, or where it has collectives one model a segment
    (segment0.onnx, ...), each with its weights as external data (FILE.data); returns the rank's record."""
    outputs = [f"stage_output_{i}" for i in range(len(ctx.pp_outputs))] or ["logits"]
    step, record = step_program(gm, ctx, form)
    program = split_at_collectives(step, outputs)
    num_segments = sum(isinstance(part, Segment) for part in program)
    files = iter([MODEL] if num_segments == 1 else [f"segment{i}.onnx" for i in range(num_segments)])
    translations = {getattr(torch.ops.llmc_onnx if name.startswith("llmc_onnx") else torch.ops.llmc, name.split("::")[1]).default: fn
                    for name, fn in LOWERINGS[form].items() if name in record["lowered"] or name == "llmc_onnx::attention"}
    sizes, ops = _dynamic_sizes(step), Counter()
    record["program"] = []
    progress = tqdm(total=num_segments, desc="[llmc] exporting ONNX segments", unit="segment", file=sys.stderr, leave=False,
                    disable=num_segments == 1)
    for part in program:
        if isinstance(part, Segment):
            file = next(files)
            ops += _export_segment(part, rank_dir / file, sizes, translations)
            progress.update()
            part = {"onnx": file}
        record["program"].append(part)
    progress.close()
    record["outputs"] = outputs
    record["lowered"] = dict(sorted(record["lowered"].items()))
    record["ops"] = dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))
    record["opset"] = OPSET
    record["form"] = form
    return record


def _export_segment(segment: Segment, path: Path, sizes: dict[str, torch.export.Dim], translations: dict) -> Counter:
    """Write one segment as `path` (+ external weights at path.data); returns its ONNX op histogram."""
    example, dims = _example_inputs(segment.module, sizes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # our dims, named once each
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch.export's own use
        program = torch.onnx.export(
            segment.module.eval(), kwargs=example, dynamic_shapes=dims, input_names=list(example),
            output_names=segment.outputs, opset_version=OPSET, custom_translation_table=translations, dynamo=True,
            # The default optimizer would fold FP8 weights back into FP32 initializers: folded below, but not them.
            optimize=False, verbose=False,
        )
    onnxscript.optimizer.fold_constants(program.model, should_fold=_foldable)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    return Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
