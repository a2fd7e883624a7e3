"""Pre-quantized checkpoints: compressed-tensors (llm-compressor's output) and NVIDIA Model Optimizer's.

Their packed weights and scales feed llmc's quantized linears as they are (docs/design.md, "Quantization
formats"): nothing is dequantized or quantized again. Per linear `X` (a module whose `X.weight_scale`
is in the checkpoint), each library's own dequantization maps onto llmc's ops so:

    compressed-tensors FP8 (float- or naive-quantized)
                                               X.weight e4m3 [N, K], X.weight_scale [1] or [N, 1]: w = q * scale;
                                               X.input_scale [1] (static) -> fp8_linear; inputs dynamic per
                                               token (FP8_DYNAMIC: scale = the token's amax / 448, as llmc's)
                                               -> fp8_dynamic_linear
    compressed-tensors NVFP4 (nvfp4-pack-quantized)
                                               X.weight_packed uint8 [N, K/2] (element 2j in the low nibble),
                                               X.weight_scale e4m3 [N, K/16], X.weight_global_scale G:
                                               w = e2m1 * scale / G, so llmc's global scale is 1 / G; the
                                               input's X.input_global_scale likewise -> nvfp4_linear
    compressed-tensors kv_cache_scheme (FP8, strategy tensor)
                                               `*.self_attn.k_scale` / `.v_scale` [1] (amax / 448) make the
                                               engine's FP8 KV cache, as Model Optimizer's do
    Model Optimizer FP8                        X.weight e4m3, X.weight_scale [] (per tensor), X.input_scale []
    Model Optimizer NVFP4 / W4A16_NVFP4        X.weight uint8 [N, K/2], X.weight_scale e4m3 [N, K/16],
                                               X.weight_scale_2 (= llmc's global scale), X.input_scale
                                               (= llmc's input global scale); K and V scales
                                               (`*.k_proj.k_scale`, `*.v_proj.v_scale`, amax / 448 as llmc's)
                                               make the engine's FP8 KV cache

A per-tensor weight scale becomes llmc's per-channel scale repeated, which is the same number per weight.
MoE experts quantized weight-only (each expert's projections mapped as above) become llmc::fp8_moe /
llmc::nvfp4_moe (llmc/frontend/prequantized_experts.py). Anything else (integer or block-wise FP8 weights, group
sizes other than 16, zero points, dynamic per-tensor input scales, output quantization, experts whose inputs are
quantized, a KV cache scale per head) is a CheckpointError naming the scheme.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

import llmc.plugins.quant_linear  # noqa: F401  (registers the ops the rewrite inserts)
from llmc.frontend.checkpoint import Checkpoint, CheckpointError
from llmc.frontend.prequantized_experts import rewrite_experts
from llmc.weights import set_weight

LINEAR = torch.ops.aten.linear.default
FP8_DYNAMIC = torch.ops.llmc.fp8_dynamic_linear.default
# Tensors beside a quantized weight that llmc's ops have no place for.
UNSUPPORTED_TENSORS = ("weight_zero_point", "weight_g_idx", "input_zero_point", "output_scale", "weight_shape",
                       "pre_quant_scale", "weight_scale_inv")


@dataclass
class Prequantized:
    """What a checkpoint's quantization_config says, checked against what llmc's ops compute."""

    source: str  # "compressed-tensors" or "modelopt"
    version: str | None
    scheme: str  # as the checkpoint names it (compressed-tensors' format, Model Optimizer's quant_algo)
    kv_cache_scales: bool = False  # the checkpoint has FP8 K and V scales per layer
    dynamic_inputs: bool = False  # FP8 linears quantize their input per token at run time (FP8_DYNAMIC)
    modes: set[str] = field(default_factory=set)  # llmc's modes of the linears and experts rewritten
    kv_amax: dict[int, list[float]] = field(default_factory=dict)  # from the KV scales, as calibration gives them

    @property
    def mode(self) -> str | None:
        return next(iter(self.modes)) if len(self.modes) == 1 else None

    def record(self) -> dict:
        return {"format": self.source, "version": self.version, "scheme": self.scheme, "kv_cache_scales": self.kv_cache_scales}


def read(ckpt: Checkpoint) -> Prequantized | None:
    """The checkpoint's quantization, or None if it has none; a CheckpointError for what llmc cannot run exactly."""
    config = getattr(ckpt.config, "quantization_config", None)
    modelopt_file = ckpt.path / "hf_quant_config.json"
    if modelopt_file.is_file() and not config:
        config = {"quant_method": "modelopt", **json.loads(modelopt_file.read_text()).get("quantization", {})}
    if not config:
        return None
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(config)
    if method == "modelopt":
        return _modelopt(config)
    raise CheckpointError(f"{ckpt.path} is quantized with quant_method {method!r}; llmc reads compressed-tensors "
                          "and modelopt checkpoints (FP8, NVFP4): use an unquantized checkpoint with --quant")


def _compressed_tensors(config: dict) -> Prequantized:
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"compressed-tensors checkpoint with quantization_status {status!r}: llmc reads "
                              "compressed checkpoints (save with save_compressed=True)")
    kv = config.get("kv_cache_scheme")
    kv_kind = kv and (kv.get("type"), kv.get("num_bits"), kv.get("strategy"), kv.get("dynamic"), kv.get("symmetric", True))
    if kv and kv_kind != ("float", 8, "tensor", False, True):
        raise CheckpointError(f"compressed-tensors kv_cache_scheme {kv.get('type')} {kv.get('num_bits')}-bit, strategy "
                              f"{kv.get('strategy')}, dynamic={kv.get('dynamic')}: llmc's FP8 KV cache takes one static "
                              "FP8 scale per layer for K and one for V (strategy tensor)")
    formats, dynamic = set(), set()
    for name, group in config.get("config_groups", {}).items():
        fmt = group.get("format") or config.get("format")
        formats.add(fmt)
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
        what = f"compressed-tensors scheme {name} ({fmt}: {kind} {bits}-bit weights, strategy {strategy})"
        if group.get("output_activations"):
            raise CheckpointError(f"{what} quantizes outputs, which llmc's linears do not")
        if fmt in ("float-quantized", "naive-quantized") and (kind, bits) == ("float", 8) and strategy in ("tensor", "channel"):
            # A static per-tensor input scale (fp8) or one per token computed at run time (FP8_DYNAMIC, fp8-dynamic).
            input_kind = inputs and (inputs.get("type"), inputs.get("num_bits"), inputs.get("strategy"), inputs.get("dynamic"))
            input_ok = input_kind in (None, ("float", 8, "tensor", False), ("float", 8, "token", True))
            dynamic.add(input_kind == ("float", 8, "token", True))
        elif fmt == "nvfp4-pack-quantized" and weights.get("group_size") == 16:
            input_ok = inputs is None or (inputs.get("num_bits"), inputs.get("group_size"), inputs.get("dynamic")) == (4, 16, "local")
        else:
            raise CheckpointError(f"{what}, group size {weights.get('group_size')}: llmc runs FP8 (per-tensor or "
                                  "per-channel weights) and NVFP4 (group size 16) only")
        if not weights.get("symmetric", True):
            raise CheckpointError(f"{what} is asymmetric (zero points): llmc's formats are symmetric")
        if not input_ok:
            raise CheckpointError(f"{what} quantizes inputs {inputs.get('strategy')}-wise with dynamic={inputs.get('dynamic')}: "
                                  "llmc's FP8 linears take a static per-tensor input scale or dynamic per-token scales "
                                  "(FP8, FP8_DYNAMIC), its NVFP4 linears a static global scale")
    if len(dynamic) > 1:
        raise CheckpointError("compressed-tensors checkpoint mixes FP8 linears with dynamic per-token input scales and "
                              "others; llmc builds one mode per engine")
    return Prequantized("compressed-tensors", config.get("version"), ", ".join(sorted(f for f in formats if f)),
                        kv_cache_scales=bool(kv), dynamic_inputs=dynamic == {True})


def _modelopt(config: dict) -> Prequantized:
    algo = config.get("quant_algo")
    if algo not in ("FP8", "NVFP4", "W4A16_NVFP4"):
        raise CheckpointError(f"Model Optimizer checkpoint with quant_algo {algo!r}: llmc reads FP8, NVFP4 and W4A16_NVFP4")
    groups = [config] + [args or {} for g in (config.get("config_groups") or {}).values()
                         for args in (g.get("weights"), g.get("input_activations"))]
    sizes = {g.get("group_size") for g in groups} - {None}
    if algo != "FP8" and sizes - {16}:
        raise CheckpointError(f"Model Optimizer {algo} with group_size {max(sizes - {16})}: NVFP4 blocks are 16 in llmc")
    kv = config.get("kv_cache_quant_algo")
    if kv is None and isinstance(config.get("kv_cache_scheme"), dict):
        kv = "FP8" if (config["kv_cache_scheme"].get("type"), config["kv_cache_scheme"].get("num_bits")) == ("float", 8) else "other"
    if kv not in (None, "FP8"):
        raise CheckpointError(f"Model Optimizer KV cache {kv!r}: llmc's quantized KV cache is FP8 with a scale per layer")
    version = (config.get("producer") or {}).get("version")
    return Prequantized("modelopt", version, algo, kv_cache_scales=kv == "FP8")


def _by_module(weights) -> dict[str, dict[str, str]]:
    """Module -> {tensor name: checkpoint key} over the checkpoint's parameter names (through transformers' renamings,
    experts' unstacked); a bias loads as any other weight."""
    modules: dict[str, dict[str, str]] = {}
    for name, key in {**weights.unconverted, **weights.keys}.items():
        module, _, tensor = name.rpartition(".")
        if tensor != "bias":
            modules.setdefault(module, {})[tensor] = key
    return modules


def _packed(pq: Prequantized, module: str, t: dict[str, torch.Tensor]):
    """-> (op, llmc mode, [(suffix, tensor)] in the op's argument order, with the input scale last or None)."""
    if bad := [s for s in UNSUPPORTED_TENSORS if s in t]:
        raise CheckpointError(f"{module} has {bad[0]} ({pq.source} {pq.scheme}), which llmc's formats have no place for")
    if pq.source == "compressed-tensors" and "weight_packed" in t:
        packed, scale = t["weight_packed"], t["weight_scale"]
        global_scale, input_global = t["weight_global_scale"], t.get("input_global_scale")
        weight = _nvfp4(module, packed, scale, 1 / global_scale.float())
        return _nvfp4_op(weight, None if input_global is None else 1 / input_global.float())
    w = t["weight"]
    if w.dtype == torch.uint8:  # Model Optimizer NVFP4
        weight = _nvfp4(module, w, t["weight_scale"], t["weight_scale_2"].float())
        return _nvfp4_op(weight, t.get("input_scale"))
    if w.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"{module}: a quantized weight of dtype {w.dtype} ({pq.source} {pq.scheme}); llmc reads "
                              "float8_e4m3fn (FP8) and packed uint8 (NVFP4) weights")
    scale = t["weight_scale"].float()
    if scale.numel() not in (1, w.shape[0]):
        raise CheckpointError(f"{module}: FP8 weight scales of shape {tuple(scale.shape)} (block-wise?): llmc's are "
                              f"per tensor or per output channel ({w.shape[0]})")
    input_scale = t.get("input_scale")
    parts = [("", w), ("_scale", scale.reshape(-1).expand(w.shape[0]).contiguous())]
    if pq.dynamic_inputs:
        if input_scale is not None:
            raise CheckpointError(f"{module} has a static input_scale, but its scheme ({pq.source} {pq.scheme}) says dynamic")
        return FP8_DYNAMIC, "fp8-dynamic", parts, None
    mode = "fp8" if input_scale is not None else "fp8-weight-only"
    return torch.ops.llmc.fp8_linear.default, mode, parts, _scalar(input_scale)


def _nvfp4(module: str, packed, block_scale, global_scale):
    n, half_k = packed.shape
    if block_scale.dtype != torch.float8_e4m3fn or tuple(block_scale.shape) != (n, half_k * 2 // 16):
        raise CheckpointError(f"{module}: NVFP4 block scales {block_scale.dtype} {tuple(block_scale.shape)}, expected "
                              f"float8_e4m3fn ({n}, {half_k * 2 // 16}) (blocks of 16)")
    return [("", packed), ("_block_scale", block_scale), ("_global_scale", _scalar(global_scale))]


def _nvfp4_op(parts, input_global_scale):
    mode = "nvfp4" if input_global_scale is not None else "nvfp4-weight-only"
    return torch.ops.llmc.nvfp4_linear.default, mode, parts, _scalar(input_global_scale)


def _scalar(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().reshape(())


def rewrite_linears(gm: fx.GraphModule, pq: Prequantized, weights) -> None:
    """Each linear whose weight the checkpoint holds quantized becomes llmc's quantized linear over the
    checkpoint's tensors (`weights`: the frontend's CheckpointWeights), registered as real buffers, and so does each
    MoE layer whose experts it holds quantized (prequantized_experts.py); the meta weights they replace are
    dropped, so the frontend loads only the others."""
    modules = _by_module(weights)
    quantized = {module for module, tensors in modules.items() if "weight_scale" in tensors}

    def packed(module: str):
        return _packed(pq, module, {name: weights.ckpt.tensor(key) for name, key in modules[module].items()})

    experts = rewrite_experts(gm, f"{pq.source} {pq.scheme}", quantized, packed)
    pq.modes.update(experts)
    done = set().union(*experts.values())
    for node in list(gm.graph.nodes):
        w = node.args[1] if node.target == LINEAR else None
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.removesuffix(".weight") in quantized):
            continue
        module = w.target.removesuffix(".weight")
        op, mode, parts, input_scale = packed(module)
        pq.modes.add(mode)
        args = []
        for suffix, value in parts + ([("_input_scale", input_scale)] if input_scale is not None else []):
            set_weight(gm, f"{w.target}_{mode.split('-')[0]}{suffix}", value)
            with gm.graph.inserting_before(node):
                args.append(gm.graph.get_attr(f"{w.target}_{mode.split('-')[0]}{suffix}"))
        if input_scale is None and op != FP8_DYNAMIC:  # weight-only (FP8_DYNAMIC's op has no static input scale)
            args.append(None)
        x, bias = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        node.target, node.args, node.kwargs = op, (x, *args, bias), {}
        if not w.users:
            gm.graph.erase_node(w)
            owner, _, attr = w.target.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
        done.add(module)
    if missed := sorted(quantized - done):
        raise CheckpointError(f"{missed[0]} is quantized in the checkpoint ({pq.source} {pq.scheme}) but is not a plain "
                              "linear or MoE expert in the traced model (a fused weight, transposed experts?): llmc cannot run it quantized")
    if len(pq.modes) > 1:
        raise CheckpointError(f"{pq.source} checkpoint mixes {', '.join(sorted(pq.modes))} weights; llmc builds one mode per engine")
    if pq.kv_cache_scales:
        pq.kv_amax = kv_cache_amax(weights)


def kv_cache_amax(weights) -> dict[int, list[float]]:
    """Layer index -> [K amax, V amax] from the checkpoint's `layers.<i>. ... .k_scale` / `.v_scale` (amax / 448;
    Model Optimizer's are on k_proj and v_proj, compressed-tensors' on the attention),
    in the form calibration gives them, so llmc's KV-cache pass turns them back into the same scales."""
    from llmc.plugins.quant_formats import E4M3_MAX

    amax: dict[int, list[float]] = {}
    for name, key in weights.keys.items():
        found = re.search(r"(?:^|\.)layers\.(\d+)\..*([kv])_scale$", name)
        if found:
            layer, which = int(found.group(1)), "kv".index(found.group(2))
            amax.setdefault(layer, [0.0, 0.0])[which] = weights.ckpt.tensor(key).float().item() * E4M3_MAX
    if not amax or any(0.0 in pair for pair in amax.values()) or sorted(amax) != list(range(len(amax))):
        raise CheckpointError("the checkpoint says its KV cache is FP8 but does not have a k_scale and a v_scale for every "
                              "layer (layers.<i>...k_scale)")
    return amax
