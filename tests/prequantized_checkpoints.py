"""Pre-quantized tiny checkpoints made by the quantization libraries themselves, with each library's own
fake-quantized (or dequantized) logits as the reference.

llm-compressor pins an older transformers, so compressed-tensors (the library that defines and writes its
format, and whose observers' formulas llm-compressor calls) quantizes here: scales by its own
`calculate_qparams` / `generate_gparam` from min/max (llm-compressor's default observer), inputs observed
on the prompt. Model Optimizer calibrates and exports itself (`mtq.quantize`, `export_hf_checkpoint`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from conftest import make_checkpoint, tokenizer

PROMPT = list(range(3, 40))


def _float_model(path: Path, seed: int, arch: str = "llama"):
    source = make_checkpoint(arch, path.with_name(path.name + "-source"), seed=seed)
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


def _input_amax(model) -> dict[str, float]:
    amax: dict[str, float] = {}

    def observe(name):
        return lambda module, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.tensor([PROMPT]))
    for h in hooks:
        h.remove()
    return amax


# An architecture's experts as its checkpoints name them: (the MoE block's name in place of "mlp", the (gate, up,
# down) projections).
EXPERT_NAMES = {"qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")), "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}


def compressed_tensors_checkpoint(scheme: str | dict, path: Path, seed: int = 3, kv_cache: bool = False,
                                  arch: str = "llama") -> tuple[Path, torch.Tensor]:
    """A compressed-tensors checkpoint of a tiny `arch` (every linear and MoE expert but the LM head; with
    `kv_cache`, K and V too: FP8 with a static scale per layer), and the logits of compressed-tensors'
    fake-quantized model on PROMPT. `scheme`: a preset name or QuantizationScheme fields."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config, preset_name_to_scheme)

    model = _float_model(path, seed, arch)
    amax = _input_amax(model)
    scheme = preset_name_to_scheme(scheme, ["Linear"]) if isinstance(scheme, str) else QuantizationScheme(targets=["Linear"], **scheme)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    kv_scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    apply_quantization_config(model, config, show_progress=False)
    experts, expert_groups = _unfused_experts(model, arch)
    if expert_groups:
        apply_quantization_config(experts, config, show_progress=False)
    with torch.no_grad():
        for name, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is not None:
                _calibrate(m, amax[name])
        _calibrate_experts(expert_groups)
        if kv_cache:
            _quantize_kv_cache(model, kv_scheme)
        expected = model(torch.tensor([PROMPT])).logits[0]
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    if kv_cache:
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["kv_cache_scheme"] = kv_scheme.model_dump(mode="json")
        (path / "config.json").write_text(json.dumps(config, indent=2))
    if expert_groups:
        ModelCompressor.from_pretrained_model(experts).compress_model(experts)
        _replace_experts(path / "model.safetensors", experts.state_dict())
    tokenizer().save_pretrained(path)
    return path, expected


def _calibrate(m, input_amax: float, gate_up_pair=None) -> None:
    """A quantized linear's scales by compressed-tensors' formulas from min/max (llm-compressor's default observer);
    `gate_up_pair`: the weights whose global scale this one shares (an expert's gate and up, as llm-compressor fuses them)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    w, args = m.weight, m.quantization_scheme.weights
    if args.strategy == "tensor_group":  # NVFP4: a global scale, then E4M3 scales per block of 16
        shared = torch.cat([p.flatten() for p in gate_up_pair]) if gate_up_pair else w
        global_scale = generate_gparam(shared.min(), shared.max())
        m.weight_global_scale.copy_(global_scale)
        blocks = w.unflatten(-1, (-1, args.group_size))
        scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=global_scale)
    elif args.strategy == "channel":
        scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    else:
        scale, _ = calculate_qparams(w.min(), w.max(), args)
    m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
    inputs = m.quantization_scheme.input_activations
    if inputs is not None and inputs.dynamic is not True:
        a = torch.tensor(input_amax)
        if inputs.strategy == "tensor_group":
            m.input_global_scale.copy_(generate_gparam(-a, a))
        else:
            m.input_scale.copy_(calculate_qparams(-a, a, inputs)[0].reshape(m.input_scale.shape))
    m.quantization_status = QuantizationStatus.FROZEN


def _unfused_experts(model, arch: str) -> tuple[torch.nn.Module, list]:
    """transformers' fused experts ([E, 2I, H] gate_up, [E, H, I] down) as the per-expert nn.Linear modules that
    checkpoints hold and compressed-tensors quantizes, named as `arch`'s checkpoints name them; and for each fused
    experts module, its experts' (gate, up, down) linears."""
    tree, groups = torch.nn.Module(), []
    if arch not in EXPERT_NAMES:
        return tree, groups
    block, (gate_name, up_name, down_name) = EXPERT_NAMES[arch]
    for name, m in model.named_modules():
        if not hasattr(m, "gate_up_proj"):
            continue
        prefix = name.replace(".mlp.", f".{block}.")
        per_expert = []
        for e in range(m.gate_up_proj.shape[0]):
            gate, up = m.gate_up_proj[e].detach().chunk(2)
            linears = []
            for projection, w in ((gate_name, gate), (up_name, up), (down_name, m.down_proj[e].detach())):
                linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                linear.weight.data = w.clone()
                parent = tree
                for part in f"{prefix}.{e}".split("."):
                    parent = parent.get_submodule(part) if hasattr(parent, part) else parent.add_module(part, torch.nn.Module()) or getattr(parent, part)
                parent.add_module(projection, linear)
                linears.append(linear)
            per_expert.append(linears)
        groups.append((m, per_expert))
    return tree, groups


def _calibrate_experts(groups) -> None:
    """Each expert's linears calibrated, and their weights fake-quantized by compressed-tensors back into the fused
    experts. Static input scales, which llmc refuses for experts, come from a made-up amax of 1."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for fused, per_expert in groups:
        for e, (gate, up, down) in enumerate(per_expert):
            for linear in (gate, up, down):
                _calibrate(linear, 1.0, (gate.weight, up.weight) if linear is not down else None)
            gate, up, down = (forward_quantize(x, x.weight, "weight", x.quantization_scheme.weights) for x in (gate, up, down))
            fused.gate_up_proj[e] = torch.cat([gate, up])
            fused.down_proj[e] = down


def _replace_experts(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The saved checkpoint's float expert weights replaced by the compressed ones."""
    from safetensors.torch import load_file, save_file

    saved = load_file(file)
    modules = {name.rpartition(".")[0] for name in tensors}
    saved = {k: v for k, v in saved.items() if k.rpartition(".")[0] not in modules}
    save_file({**saved, **{k: v.contiguous() for k, v in tensors.items()}}, file, metadata={"format": "pt"})


def _quantize_kv_cache(model, args) -> None:
    """Each attention's FP8 k_scale and v_scale, from the amax of its K and V on PROMPT by compressed-tensors'
    formula, and from then on its K and V fake-quantized by compressed-tensors' own `forward_quantize`, the call
    its QuantizedKVCache makes. (compressed-tensors 0.20.1 does not find transformers 5's attentions, whose
    forward takes `cache` where it looks for `past_key_values`; so this does its part by hand, and the config's
    kv_cache_scheme is written after saving, as compressed-tensors writes it.)"""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    amax = {}

    def attention(module, query, key, value, *args, **kwargs):
        if hasattr(module, "k_scale"):
            key, value = forward_quantize(module, key, "k", kv_args), forward_quantize(module, value, "v", kv_args)
        else:
            amax[module] = key.abs().max(), value.abs().max()
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    kv_args = args
    AttentionInterface.register("compressed_tensors_fp8_kv", attention)
    model.set_attn_implementation("compressed_tensors_fp8_kv")
    model(torch.tensor([PROMPT]))  # K and V of the quantized linears, unquantized
    for module, pair in amax.items():
        module.quantization_status = QuantizationStatus.FROZEN
        for which, a in zip("kv", pair):
            module.register_parameter(f"{which}_scale", torch.nn.Parameter(calculate_qparams(-a, a, args)[0], requires_grad=False))


def modelopt_checkpoint(config_name: str, path: Path, kv_cache: bool = False, seed: int = 4,
                       arch: str = "llama") -> tuple[Path, torch.Tensor]:
    """A Model Optimizer checkpoint of a tiny Llama calibrated on PROMPT, and the reference logits: Model
    Optimizer's fake-quantized model for FP8; for NVFP4, whose fake quantization needs CUDA, the float model
    with the exported weights dequantized and each linear's input quantized and dequantized, both by Model
    Optimizer's own NVFP4QTensor (on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

    model = _float_model(path, seed, arch)
    config = copy.deepcopy(getattr(mtq, config_name))
    if kv_cache:
        config["quant_cfg"] = config["quant_cfg"] + mtq.FP8_KV_CFG["quant_cfg"]
    ids = torch.tensor([PROMPT])
    model = mtq.quantize(model, config, lambda m: m(ids))
    expected = None
    if "NVFP4" not in config_name:
        with torch.no_grad():
            expected = model(ids).logits[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=path)
    tokenizer().save_pretrained(path)
    if expected is None:
        expected = _modelopt_nvfp4_reference(path, seed, arch)
    return path, expected


def _modelopt_nvfp4_reference(path: Path, seed: int, arch: str) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    model = _float_model(path, seed, arch)

    def dequantized(name, like):
        packed = NVFP4QTensor(like.shape, like.dtype, tensors[f"{name}.weight"])
        return packed.dequantize(scale=tensors[f"{name}.weight_scale"], double_scale=tensors[f"{name}.weight_scale_2"],
                                 block_sizes={-1: 16})

    def fake_quantize_input(input_scale):
        def hook(module, args):
            q, scale, scale_2 = NVFP4QTensor.quantize(args[0], 16, weights_scaling_factor_2=input_scale)
            return (q.dequantize(scale=scale, double_scale=scale_2, block_sizes={-1: 16}, dtype=args[0].dtype),)
        return hook

    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "gate_up_proj") and f"{name}.0.gate_proj.weight_scale_2" in tensors:  # fused experts
                for e in range(m.gate_up_proj.shape[0]):
                    gate, up = m.gate_up_proj[e].chunk(2)
                    m.gate_up_proj[e] = torch.cat([dequantized(f"{name}.{e}.gate_proj", gate), dequantized(f"{name}.{e}.up_proj", up)])
                    m.down_proj[e] = dequantized(f"{name}.{e}.down_proj", m.down_proj[e])
            if f"{name}.weight_scale_2" not in tensors:
                continue
            m.weight.copy_(dequantized(name, m.weight))
            if f"{name}.input_scale" in tensors:
                m.register_forward_pre_hook(fake_quantize_input(tensors[f"{name}.input_scale"]))
        return model(torch.tensor([PROMPT])).logits[0]
