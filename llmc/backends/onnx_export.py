"""A rank's graph as an ONNX program (build time only; the runtime never imports this module).

The ONNX program computes DESIGN.md's step contract with one cache block per sequence, the block
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
op's plain-torch reference traced by torch.onnx into standard ops (fallback).
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from pathlib import Path

import onnx
import onnxscript
import onnxscript.optimizer
import torch
import torch.fx as fx
from onnxscript import ir
from onnxscript import opset23 as op

import llmc.plugins  # noqa: F401  (the ops the rank graph calls)
from llmc.plugins import activations, attention, collectives, norms, rotary
from llmc.plugins.quant_formats import E2M1_BY_CODE, E2M1_MAX, E2M1_TIES_DOWN, E2M1_TIES_UP, NVFP4_BLOCK

OPSET = 23
QDQ = ("QuantizeLinear", "DequantizeLinear")
MODEL = "model.onnx"
FORMS = ("onnxruntime", "standard")

# The attention of one call, functional: (out [1,H,T,D], present_key, present_value).
torch.library.define(
    "llmc_onnx::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor past_key, Tensor past_value, Tensor seqlens_k, Tensor total_sequence_length, "
    "int num_heads, int num_kv_heads, float scale, int sliding_window) -> (Tensor, Tensor, Tensor)",
)
torch.library.register_fake(
    "llmc_onnx::attention",
    lambda q, k, v, past_key, past_value, *_: (torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)),
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
                    A("local_window_size", onnx.defs.OpSchema.AttrType.INT, "")],
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


def attention_gqa(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, num_kv_heads, scale, sliding_window):
    head_dim = q.shape[3]
    batch = op.Shape(seqlens_k)
    out, present_key, present_value = msft.GroupQueryAttention(
        _flat_to_batch(q, batch, num_heads, head_dim), _flat_to_batch(k, batch, num_kv_heads, head_dim),
        _flat_to_batch(v, batch, num_kv_heads, head_dim), past_key, past_value, seqlens_k, total_sequence_length,
        num_heads=num_heads, kv_num_heads=num_kv_heads, scale=scale,
        # ORT's window, like llmc's (HF's), counts the query itself (checked on Mistral).
        local_window_size=sliding_window if sliding_window > 0 else -1,
    )
    return _batch_to_flat(out, num_heads, head_dim), present_key, present_value


def attention_standard(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, num_kv_heads, scale, sliding_window):
    head_dim = q.shape[3]
    batch = op.Shape(seqlens_k)
    # [1, heads, B*S, D] -> [B, heads, S, D]
    to_batch = lambda x, h: op.Transpose(  # noqa: E731
        op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Concat(batch, op.Constant(value_ints=[-1, h, head_dim]), axis=0)),
        perm=[0, 2, 1, 3],
    )
    qb, kb, vb = to_batch(q, num_heads), to_batch(k, num_kv_heads), to_batch(v, num_kv_heads)
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
    expanded = op.Concat(batch, op.Constant(value_ints=[num_kv_heads, group]), cache_len, op.Constant(value_ints=[head_dim]), axis=0)
    merged = op.Concat(batch, op.Constant(value_ints=[num_heads]), cache_len, op.Constant(value_ints=[head_dim]), axis=0)
    repeat = lambda x: op.Reshape(op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])), expanded), merged)  # noqa: E731
    keys, values = repeat(present_key), repeat(present_value)
    scores = op.Mul(op.MatMul(qb, op.Transpose(keys, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), qb))
    # Causal over the row: key position <= query position (and within the window).
    key_pos = op.Range(op.Constant(value_int=0), op.Squeeze(cache_len), op.Constant(value_int=1))
    query_pos = op.Unsqueeze(positions, op.Constant(value_ints=[1, 3]))  # [B, 1, S, 1]
    allowed = op.LessOrEqual(key_pos, query_pos)
    if sliding_window > 0:
        allowed = op.And(allowed, op.Greater(key_pos, op.Sub(query_pos, op.Constant(value_int=sliding_window))))
    lowest = op.CastLike(op.Constant(value_float=float(torch.finfo(torch.float16).min)), scores)
    probs = op.Softmax(op.Where(allowed, scores, lowest), axis=-1)
    out = op.MatMul(probs, values)  # [B, H, S, D]
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[1, -1, num_heads, head_dim]))
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
# Ops with no ONNX form: a rank graph holding one cannot be exported.
UNSUPPORTED = {
    "llmc::all_reduce": "tensor-parallel collectives have no ONNX op; build with --tp 1 (pipeline parallelism works)",
    "llmc::all_gather": "tensor-parallel collectives have no ONNX op; build with --tp 1 (pipeline parallelism works)",
}


class OnnxExportError(ValueError):
    """A rank graph the ONNX form cannot express; the message names the op and what to build instead."""


def _op_name(node: fx.Node) -> str | None:
    return node.target.name().replace(".default", "") if isinstance(node.target, torch._ops.OpOverload) else None


def step_program(gm: fx.GraphModule, max_seq_len: int, form: str) -> tuple[fx.GraphModule, dict]:
    """The rank graph with paged attention replaced by llmc_onnx::attention over per-layer cache rows,
    and llmc ops without a lowering in `form` replaced by their references. Also returns how each
    llmc op was lowered: {op: "native ..." | "fallback"} (fallback: its plain-torch reference, traced)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # a copy: the backend's rewrite leaves the rank graph as it is
    gm = fx.GraphModule(gm, graph)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    paged = [n for n in graph.nodes if _op_name(n) == "llmc::paged_attention"]
    if not paged:
        raise OnnxExportError("the rank graph has no llmc::paged_attention; it was not built by llmc's passes")
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def new_input(name: str) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        return anchor

    seqlens_k, total = new_input("seqlens_k"), new_input("total_sequence_length")
    presents = []
    num_kv_heads = head_dim = None
    lowered = {"llmc::paged_attention": ATTENTION[form]}
    for node in paged:
        q, k, v, _, layer, _, _, _, _, scale, window, *scales = node.args
        if any(s is not None for s in scales):
            raise OnnxExportError("an FP8 KV cache (k_scale/v_scale) has no ONNX lowering yet; build without a quantized KV cache")
        num_heads, num_kv_heads, head_dim = q.meta["val"].shape[1], k.meta["val"].shape[1], q.meta["val"].shape[3]
        past = [new_input(f"past_key_{layer}"), new_input(f"past_value_{layer}")]
        with graph.inserting_before(node):
            if node.kwargs.get("cos") is not None:  # RoPE folded into the op: applied before it, by its reference
                rope = (node.kwargs["cos"], node.kwargs["sin"], node.kwargs.get("rotary_interleaved", False))
                q, k = (graph.call_function(attention.apply_rope, (x, *rope)) for x in (q, k))
                lowered["llmc::paged_attention's RoPE"] = "fallback"
            attn = graph.call_function(
                torch.ops.llmc_onnx.attention.default,
                (q, k, v, *past, seqlens_k, total, int(num_heads), int(num_kv_heads), float(scale), int(window)),
            )
            out = graph.call_function(operator.getitem, (attn, 0))
            presents += [graph.call_function(operator.getitem, (attn, i)) for i in (1, 2)]
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
        if name in UNSUPPORTED:
            raise OnnxExportError(f"{name}: {UNSUPPORTED[name]}")
        if name in LOWERINGS[form]:
            lowered[name] = "native"
        elif name in REFERENCES:
            node.target = REFERENCES[name]
            lowered[name] = "fallback"
        else:
            raise OnnxExportError(f"{name} has no ONNX lowering and no plain-torch reference to fall back to")
    graph.lint()
    gm.recompile()
    return gm, {"lowered": lowered, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "num_layers": len(paged)}


def _example_inputs(gm: fx.GraphModule, max_seq_len: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int):
    """One call of two sequences with three new tokens each, for tracing; and the dynamic dims."""
    batch, new, tokens = 2, 3, 6
    T, B = torch.export.Dim("num_tokens", min=1), torch.export.Dim("batch", min=1)
    L = torch.export.Dim("num_logits", min=1)
    example, dims = {}, {}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        name = n.target
        if name in ("input_ids", "position_ids"):
            example[name], dims[name] = torch.zeros(1, tokens, dtype=torch.int64), {1: T}
        elif name == "logits_indices":
            example[name], dims[name] = torch.tensor([2, 5]), {0: L}
        elif name == "seqlens_k":
            example[name], dims[name] = torch.full((batch,), 4 + new - 1, dtype=torch.int32), {0: B}
        elif name == "total_sequence_length":
            example[name], dims[name] = torch.tensor(4 + new, dtype=torch.int32), None
        elif name.startswith("past_"):
            example[name] = torch.zeros(batch, num_kv_heads, max_seq_len, head_dim, dtype=dtype)
            dims[name] = {0: B}
        else:  # a tensor from the previous pipeline stage: [1, T, ...]
            val = n.meta["val"]
            example[name] = torch.zeros([tokens if not isinstance(d, int) else d for d in val.shape], dtype=val.dtype)
            dims[name] = {i: T for i, d in enumerate(val.shape) if not isinstance(d, int)}
    return example, dims


def _foldable(node: ir.Node) -> bool | None:
    """False for nodes whose folding would turn packed weights into float initializers: FP8's Q/DQ and
    the ops reading FP4's packed bytes (uint8); None leaves the rest to the folder's own rules."""
    if node.op_type in QDQ or any(v is not None and v.dtype == ir.DataType.UINT8 for v in node.inputs):
        return False
    return None


def export_rank(gm: fx.GraphModule, path: Path, *, max_seq_len: int, dtype: torch.dtype, form: str,
                output_names: list[str]) -> dict:
    """Write `gm` (a rank graph) as `path` (+ external weights at path.data); returns its record."""
    step, record = step_program(gm, max_seq_len, form)
    step.eval()
    example, dims = _example_inputs(step, max_seq_len, dtype, record["num_kv_heads"], record["head_dim"])
    layers = record["num_layers"]
    output_names = output_names + [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    translations = {getattr(torch.ops.llmc_onnx if name.startswith("llmc_onnx") else torch.ops.llmc, name.split("::")[1]).default: fn
                    for name, fn in LOWERINGS[form].items() if name in record["lowered"] or name == "llmc_onnx::attention"}
    record["lowered"] = dict(sorted(record["lowered"].items()))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # our dims, named once each
        program = torch.onnx.export(
            step, kwargs=example, dynamic_shapes=dims, input_names=list(example), output_names=output_names,
            opset_version=OPSET, custom_translation_table=translations, dynamo=True,
            # The default optimizer would fold FP8 weights back into FP32 initializers: folded below, but not them.
            optimize=False, verbose=False,
        )
    onnxscript.optimizer.fold_constants(program.model, should_fold=_foldable)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    record["ops"] = dict(sorted(Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node
    ).items(), key=lambda kv: (-kv[1], kv[0])))
    record["opset"] = OPSET
    record["form"] = form
    return record
