"""Pre-quantized checkpoints (llmc/frontend/prequantized.py): compressed-tensors and Model Optimizer
checkpoints made by those libraries build into engines over their own packed tensors, whose logits match
each library's fake-quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import llmc
from llmc import LLM, SamplingParams
from llmc.engine import EngineConfig
from llmc.frontend.checkpoint import CheckpointError
from llmc.passes.manager import PassError

from prequantized_checkpoints import PROMPT, compressed_tensors_checkpoint, modelopt_checkpoint
from test_quantization import reference_logits, step_logits

FP8_CHANNEL_WEIGHT_ONLY = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}
# name -> (how the checkpoint is made, llmc's mode of its linears)
CHECKPOINTS = {
    "ct-fp8": (lambda p: compressed_tensors_checkpoint("FP8", p), "fp8"),
    "ct-fp8-dynamic": (lambda p: compressed_tensors_checkpoint("FP8_DYNAMIC", p), "fp8-dynamic"),
    "ct-nvfp4-fp8-kv": (lambda p: compressed_tensors_checkpoint("NVFP4", p, kv_cache=True), "nvfp4"),
    "ct-fp8-channel-weight-only": (lambda p: compressed_tensors_checkpoint(FP8_CHANNEL_WEIGHT_ONLY, p), "fp8-weight-only"),
    "ct-nvfp4": (lambda p: compressed_tensors_checkpoint("NVFP4", p), "nvfp4"),
    "ct-nvfp4a16": (lambda p: compressed_tensors_checkpoint("NVFP4A16", p), "nvfp4-weight-only"),
    "ct-qwen3-moe-nvfp4a16": (lambda p: compressed_tensors_checkpoint("NVFP4A16", p, arch="qwen3_moe"), "nvfp4-weight-only"),
    "ct-mixtral-fp8-weight-only": (lambda p: compressed_tensors_checkpoint(FP8_CHANNEL_WEIGHT_ONLY, p, arch="mixtral"), "fp8-weight-only"),
    "modelopt-fp8-kv": (lambda p: modelopt_checkpoint("FP8_DEFAULT_CFG", p, kv_cache=True), "fp8"),
    "modelopt-nvfp4": (lambda p: modelopt_checkpoint("NVFP4_DEFAULT_CFG", p), "nvfp4"),
    "modelopt-w4a16-nvfp4": (lambda p: modelopt_checkpoint("W4A16_NVFP4_CFG", p), "nvfp4-weight-only"),
    "modelopt-qwen3-moe-w4a16-nvfp4": (lambda p: modelopt_checkpoint("W4A16_NVFP4_CFG", p, arch="qwen3_moe"), "nvfp4-weight-only"),
}
# Largest |llmc - library| logit allowed (the logits reach about 1.5): the same numbers up to fp32 summation
# order, and for compressed-tensors NVFP4 a scale divided by G where llmc multiplies by 1 / G. Measured: at
# most 5e-7 in every scheme. (W4A4 quantizes inputs at run time: a last-bit difference could move an element
# across an E2M1 rounding boundary, which would show here as a larger difference.)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequantized")
    cache = {}

    def get(name: str):
        if name not in cache:
            make, mode = CHECKPOINTS[name]
            checkpoint, expected = make(root / name)
            engine = llmc.build(checkpoint, root / f"{name}-engine", max_seq_len=64, log=lambda _: None)
            cache[name] = checkpoint, engine, expected, mode
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_prequantized_checkpoint_matches_library(built, name):
    checkpoint, engine, expected, mode = built(name)
    config = EngineConfig.load(engine)
    source = "modelopt" if name.startswith("modelopt") else "compressed-tensors"
    assert config.quantization["mode"] == mode and config.quantization["checkpoint"]["format"] == source
    assert config.quantization["calibration"] is None  # the checkpoint's scales, none of llmc's
    logits = step_logits(engine, PROMPT)
    diff = (logits - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{name}: max |llmc - library| {diff}"
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))  # greedy tokens
    # The C++ kernels against the ops' plain-torch references, as for llmc's own quantization.
    torch.testing.assert_close(logits, reference_logits(engine, PROMPT), atol=1e-4, rtol=1e-4)
    outputs = LLM(engine).generate([PROMPT[:5]], SamplingParams(max_tokens=4, temperature=0))
    assert len(outputs[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("name", ["ct-nvfp4", "modelopt-fp8-kv"])
def test_engine_holds_the_checkpoints_packed_tensors(built, name):
    """No dequantize-requantize round trip: the engine's weights are the checkpoint's bytes."""
    checkpoint, engine, _, _ = built(name)
    with safe_open(checkpoint / "model.safetensors", "pt") as ckpt, safe_open(engine / "rank0" / "weights.safetensors", "pt") as eng:
        prefix = "model.layers.1.mlp.down_proj."
        if name == "ct-nvfp4":
            pairs = [("weight_packed", "weight_nvfp4"), ("weight_scale", "weight_nvfp4_block_scale")]
        else:
            pairs = [("weight", "weight_fp8")]
        for theirs, ours in pairs:
            assert torch.equal(ckpt.get_tensor(prefix + theirs).view(torch.uint8), eng.get_tensor(prefix + ours).view(torch.uint8))


def test_engine_holds_the_checkpoints_packed_experts(built):
    checkpoint, engine, _, _ = built("ct-qwen3-moe-nvfp4a16")
    with safe_open(checkpoint / "model.safetensors", "pt") as ckpt, safe_open(engine / "rank0" / "weights.safetensors", "pt") as eng:
        experts = "model.layers.1.mlp.experts"
        gate_up, scales = eng.get_tensor(f"{experts}.gate_up_proj_nvfp4"), eng.get_tensor(f"{experts}.gate_up_proj_nvfp4_block_scale")
        for e in range(8):
            theirs = [ckpt.get_tensor(f"{experts}.{e}.{p}_proj.weight_packed") for p in ("gate", "up")]
            assert torch.equal(gate_up[e], torch.cat(theirs))
            theirs = [ckpt.get_tensor(f"{experts}.{e}.{p}_proj.weight_scale").view(torch.uint8) for p in ("gate", "up")]
            assert torch.equal(scales[e].view(torch.uint8), torch.cat(theirs))
        down = eng.get_tensor(f"{experts}.down_proj_nvfp4_global_scale")
        assert torch.equal(down, torch.stack([1 / ckpt.get_tensor(f"{experts}.{e}.down_proj.weight_global_scale").reshape(()) for e in range(8)]))


@pytest.mark.parametrize("name, module", [("modelopt-fp8-kv", "self_attn.{which}_proj"), ("ct-nvfp4-fp8-kv", "self_attn")])
def test_fp8_kv_cache_takes_the_checkpoints_scales(built, name, module):
    checkpoint, engine, _, _ = built(name)
    config = EngineConfig.load(engine)
    assert config.quantization["kv_cache_dtype"] == "fp8" and config.kv_cache["dtype"] == "float8_e4m3fn"
    assert config.quantization["checkpoint"]["kv_cache_scales"]
    with safe_open(checkpoint / "model.safetensors", "pt") as ckpt, safe_open(engine / "rank0" / "weights.safetensors", "pt") as eng:
        for layer in range(2):
            for which in "kv":
                theirs = ckpt.get_tensor(f"model.layers.{layer}.{module.format(which=which)}.{which}_scale")
                assert eng.get_tensor(f"kv_cache_{which}_scale_{layer}").item() == theirs.item()


def test_modelopt_checkpoint_with_hf_quant_config_json_alone(built, tmp_path):
    """Older Model Optimizer exports say how they are quantized in hf_quant_config.json only."""
    checkpoint, engine, _, _ = built("modelopt-w4a16-nvfp4")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]
    path = _copy_with_config(checkpoint, tmp_path / "checkpoint", config)
    alone = llmc.build(path, tmp_path / "engine", max_seq_len=64, log=lambda _: None)
    assert EngineConfig.load(alone).quantization["checkpoint"]["scheme"] == "W4A16_NVFP4"
    torch.testing.assert_close(step_logits(alone, PROMPT), step_logits(engine, PROMPT), atol=0, rtol=0)


def test_fp8_kv_cache_of_a_checkpoint_without_kv_scales_is_calibrated(built, tmp_path):
    """Calibration runs the graph with the checkpoint's quantized linears in it."""
    checkpoint, engine, _, _ = built("ct-nvfp4a16")
    fp8_cache = llmc.build(checkpoint, tmp_path / "kv", max_seq_len=64, kv_cache_dtype="fp8", calib_samples=2, log=lambda _: None)
    quantization = EngineConfig.load(fp8_cache).quantization
    assert quantization["kv_cache_dtype"] == "fp8" and quantization["calibration"]["samples"] == 2
    assert quantization["mode"] == "nvfp4-weight-only"
    # An FP8 cache of well-calibrated K and V changes tiny logits little.
    torch.testing.assert_close(step_logits(fp8_cache, PROMPT), step_logits(engine, PROMPT), atol=0.05, rtol=0)


@pytest.mark.parametrize("name, mapping", [(n, m) for n in ("ct-nvfp4", "modelopt-fp8-kv", "ct-nvfp4-fp8-kv") for m in ({"tp": 2}, {"pp": 2})]
                         + [("ct-fp8-dynamic", {"pp": 2})]
                         + [(n, m) for n in ("ct-qwen3-moe-nvfp4a16", "ct-mixtral-fp8-weight-only") for m in ({"tp": 2}, {"ep": 2})]
                         + [("modelopt-qwen3-moe-w4a16-nvfp4", {"tp": 2})])
def test_parallel_prequantized_engine_equals_single_rank(built, tmp_path, name, mapping):
    """Tensor parallelism shards the packed weights and their scales (NVFP4 blocks whole); pipeline stages split them;
    expert parallelism gives each rank its experts' packed tensors."""
    checkpoint, engine, _, _ = built(name)
    parallel = llmc.build(checkpoint, tmp_path / "parallel", max_seq_len=64, log=lambda _: None, **mapping)
    torch.testing.assert_close(step_logits(parallel, PROMPT), step_logits(engine, PROMPT), atol=1e-5, rtol=1e-5)


# Largest |llmc at tp 2 - library| logit for FP8_DYNAMIC: a row-parallel linear quantizes each token's share of
# its input with that share's own amax (as vLLM does, and llmc's --quant fp8-dynamic), where the library takes
# the whole row's. Measured: 0.018 (the logits reach about 1.5).
DYNAMIC_TP_TOLERANCE = 0.05


def test_fp8_dynamic_at_tp2_scales_each_ranks_share_of_a_token(built, tmp_path):
    checkpoint, engine, expected, _ = built("ct-fp8-dynamic")
    parallel = step_logits(llmc.build(checkpoint, tmp_path / "tp2", max_seq_len=64, tp=2, log=lambda _: None), PROMPT)
    assert 0 < (parallel - expected).abs().max().item() <= DYNAMIC_TP_TOLERANCE


def test_what_llmc_cannot_run_exactly_is_a_one_line_error(built, tmp_path):
    checkpoint = built("ct-fp8")[0]
    with pytest.raises(ValueError, match="quantized already; build it without --quant"):
        llmc.build(checkpoint, tmp_path / "e1", quant="nvfp4", log=lambda _: None)
    dynamic_per_tensor = _preset_group("FP8_DYNAMIC")
    dynamic_per_tensor["input_activations"]["strategy"] = "tensor"
    kv_per_head = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "attn_head", "dynamic": False}
    cases = {  # name -> (what changes in quantization_config, the error's message)
        "dynamic-per-tensor": ({"config_groups": {"group_0": dynamic_per_tensor}}, "tensor-wise with dynamic=True"),
        "w4a16": ({"config_groups": {"group_0": _preset_group("W4A16")}}, "llmc runs FP8 .* and NVFP4 .* only"),
        "kv-per-head": ({"kv_cache_scheme": kv_per_head}, "strategy attn_head.*one static FP8 scale per layer"),
    }
    for name, (change, message) in cases.items():
        config = json.loads((checkpoint / "config.json").read_text())
        config["quantization_config"].update(change)
        path = _copy_with_config(checkpoint, tmp_path / name, config)
        with pytest.raises(CheckpointError, match=message) as error:
            llmc.build(path, tmp_path / f"{name}-engine", log=lambda _: None)
        assert "\n" not in str(error.value)


def test_quantized_experts_llmc_cannot_run_exactly_are_one_line_errors(built, tmp_path):
    from safetensors.torch import load_file, save_file

    w8a8, _ = compressed_tensors_checkpoint("FP8", tmp_path / "w8a8", arch="qwen3_moe")
    with pytest.raises(CheckpointError, match="experts quantize their inputs .*llmc mode fp8.*weight-only") as error:
        llmc.build(w8a8, tmp_path / "w8a8-engine", log=lambda _: None)
    assert "\n" not in str(error.value)

    checkpoint = built("ct-qwen3-moe-nvfp4a16")[0]
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.1.mlp.experts.5.up_proj.weight_global_scale"] *= 2
    path = _copy_with_config(checkpoint, tmp_path / "separate-global-scales", json.loads((checkpoint / "config.json").read_text()))
    (path / "model.safetensors").unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="experts.5: gate and up have different NVFP4 global scales") as error:
        llmc.build(path, tmp_path / "separate-engine", log=lambda _: None)
    assert "\n" not in str(error.value)

    with pytest.raises(PassError, match=r"tp=4 gives each rank 8 of an MoE layer's 32 .*\(16 features a column\)"):
        llmc.build(checkpoint, tmp_path / "tp4", tp=4, log=lambda _: None)


def _preset_group(name: str) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme

    group = preset_name_to_scheme(name, ["Linear"]).model_dump(mode="json")
    group["format"] = "float-quantized" if name.startswith("FP8") else "pack-quantized"
    return group


def _copy_with_config(checkpoint, path, config: dict):
    """The checkpoint's files (linked) with another config.json."""
    path.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (path / f.name).symlink_to(f)
    (path / "config.json").write_text(json.dumps(config))
    return path
