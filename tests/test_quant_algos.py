"""`--quant-algo`: each algorithm lowers the error it targets against round-to-nearest, on the example model's own
weights and calibration activations, and builds engines that generate (docs/design.md, "Quantization formats")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmc
from llmc import LLM, SamplingParams
from llmc.cli import main
from llmc.engine import EngineConfig
from llmc.engine_cache import resolve_engine
from llmc.evaluate import perplexity
from llmc.frontend.calibration import DEFAULT_CORPUS
from llmc.passes.quant_algos import quantize_weight
from llmc.passes.quant_algos.awq import awq_scales
from llmc.passes.quant_algos.smoothquant import smoothquant_scales
from llmc.plugins.quant_formats import dequantize_fp8, dequantize_nvfp4, fake_quantize_nvfp4_activation, quantize_fp8

from conftest import make_checkpoint

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "stdlib-llama"
HELDOUT = EXAMPLE / "heldout.txt"
FORMATS = ["fp8", "nvfp4"]


def fake_quantize(w: torch.Tensor, fmt: str, algo: str = "rtn", hessian=None) -> torch.Tensor:
    parts = quantize_weight(w, fmt, algo, hessian)
    return dequantize_fp8(parts[0], parts[1][:, None]) if fmt == "fp8" else dequantize_nvfp4(*parts)


@pytest.fixture(scope="module")
def example_layer():
    """Layer 1 of the example model: its Q/K/V and down weights and their inputs on 256 tokens of calibration text."""
    model = AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(EXAMPLE)(DEFAULT_CORPUS.read_text()[:4000])["input_ids"][:256]
    layer, inputs = model.model.layers[1], {}
    hooks = [module.register_forward_pre_hook(lambda _, args, key=key: inputs.__setitem__(key, args[0][0].detach()))
             for key, module in (("qkv", layer.self_attn.q_proj), ("down", layer.mlp.down_proj))]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    attn = layer.self_attn
    return {
        "qkv": ([m.weight.detach() for m in (attn.q_proj, attn.k_proj, attn.v_proj)], inputs["qkv"]),
        "down": ([layer.mlp.down_proj.weight.detach()], inputs["down"]),
    }


def stats_of(x: torch.Tensor) -> dict:
    return {"inputs": x, "channel_mean_abs": x.abs().mean(0), "channel_amax": x.abs().amax(0), "hessian": x.T @ x}


def output_error(x, weights, quantized) -> float:
    return sum((x @ (q - w).T).pow(2).sum().item() for w, q in zip(weights, quantized))


@pytest.mark.parametrize("fmt", FORMATS)
def test_mse_weight_error_is_at_most_rtns(example_layer, fmt):
    """The searched scales never do worse than amax scales on any real weight, and do better overall."""
    weights = [w for ws, _ in example_layer.values() for w in ws]
    rtn = [(fake_quantize(w, fmt) - w).pow(2).sum().item() for w in weights]
    mse = [(fake_quantize(w, fmt, "mse") - w).pow(2).sum().item() for w in weights]
    assert all(m <= r for m, r in zip(mse, rtn))
    assert sum(mse) < 0.99 * sum(rtn)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", ["qkv", "down"])
def test_gptq_lowers_the_layer_output_error(example_layer, fmt, group):
    weights, x = example_layer[group]
    rtn = output_error(x, weights, [fake_quantize(w, fmt) for w in weights])
    gptq = output_error(x, weights, [fake_quantize(w, fmt, "gptq", x.T @ x) for w in weights])
    assert gptq < 0.9 * rtn


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", ["qkv", "down"])
def test_awq_lowers_the_layer_output_error(example_layer, fmt, group):
    weights, x = example_layer[group]
    s, alpha = awq_scales(stats_of(x), weights, lambda w: fake_quantize(w, fmt))
    rtn = output_error(x, weights, [fake_quantize(w, fmt) for w in weights])
    awq = output_error(x, weights, [fake_quantize(w * s, fmt, "mse") / s for w in weights])
    assert alpha > 0 and awq < 0.95 * rtn


@pytest.mark.parametrize("fmt", FORMATS)
def test_smoothquant_lowers_the_w8a8_output_error(example_layer, fmt):
    """With the input quantized too (a static per-tensor scale from its amax, as W8A8/W4A4 calibrate), smoothing lowers
    the down projection's output error, with the example model's activations and with the outlier channels of large LLMs
    (4 channels x 50, the weights' columns / 50: the same function). Only by a few percent: E4M3 is a floating-point
    format, and NVFP4 activations have a scale per block of 16, so outliers cost them far less than they cost INT8."""
    (w,), x = example_layer["down"]

    def quantized_output(x, w):
        if fmt == "fp8":
            scale = x.abs().amax() / 448
            x = dequantize_fp8(quantize_fp8(x, scale), scale)
        else:
            x = fake_quantize_nvfp4_activation(x, x.abs().amax() / (6 * 448))
        return x @ fake_quantize(w, fmt).T

    def errors(x, w):
        s = smoothquant_scales(stats_of(x), [w])
        reference = x @ w.T
        return [(quantized_output(x / s, w * s) - reference).pow(2).sum() / (quantized_output(x, w) - reference).pow(2).sum()
                for s in (torch.ones_like(s), s)][1]

    assert errors(x, w) < 0.99
    outliers = torch.ones(x.shape[1])
    outliers[[3, 100, 200, 300]] = 50.0
    assert errors(x * outliers, w / outliers) < 0.99


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("algo") / "llama", seed=2)


@pytest.mark.parametrize("mode, algo", [("fp8", "mse"), ("nvfp4-weight-only", "awq"), ("nvfp4", "gptq"),
                                        ("fp8", "smoothquant"), ("nvfp4", "awq"), ("fp8-dynamic", "smoothquant")])
def test_algorithm_builds_an_engine_that_generates(tiny_llama, tmp_path, mode, algo):
    """--verify-passes holds the smoothing pass to fp32's tolerance: folding the scales into the norms and up projections
    leaves the model's function unchanged."""
    engine = llmc.build(tiny_llama, tmp_path / "e", quant=mode, quant_algo=algo, calib_samples=4, max_seq_len=64,
                        verify_passes=True, log=lambda _: None)
    config = EngineConfig.load(engine)
    assert config.quantization["algo"] == algo
    records = {r["pass"]: r for r in config.passes + config.ranks[0]["passes"]}
    assert records["quantize"]["algo"] == algo
    if algo in ("awq", "smoothquant"):
        assert records["smooth_activations"]["groups"] == 2 * 3  # per layer: Q/K/V, gate/up, down
    if algo == "gptq":
        assert records["quantize"]["gptq_weights"] == records["quantize"]["quantized"] - 1  # all but the embedding
    outputs = LLM(engine).generate([[1, 2, 3], list(range(10, 30))], SamplingParams(max_tokens=6, temperature=0))
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)


def test_perplexity_of_the_example_model_by_algorithm(tmp_path):
    """nvfp4-weight-only on held-out text: every algorithm loses less than round-to-nearest (README's table)."""
    ppl = {}
    for algo in ("rtn", "mse", "awq", "gptq"):
        engine = llmc.build(EXAMPLE, tmp_path / algo, quant="nvfp4-weight-only", quant_algo=algo, calib_samples=16, log=lambda _: None)
        ppl[algo] = perplexity(engine, HELDOUT, window=256, max_tokens=2048)["ppl"]
    assert ppl["mse"] <= ppl["rtn"]
    assert ppl["awq"] < ppl["rtn"] and ppl["gptq"] < ppl["rtn"]


@pytest.mark.parametrize("args, message", [
    (["--quant-algo", "smoothquant", "--quant", "fp8-weight-only"], "smoothquant eases activation quantization"),
    (["--quant-algo", "gptq"], "give --quant too"),
])
def test_algorithm_that_does_not_apply_is_a_clear_error(tiny_llama, tmp_path, args, message):
    result = CliRunner().invoke(main, ["build", str(tiny_llama), "-o", str(tmp_path / "e"), *args])
    assert result.exit_code != 0 and message in result.output


def test_an_engine_names_its_algorithm(tiny_llama, tmp_path):
    engine = llmc.build(tiny_llama, tmp_path / "e", quant="fp8-weight-only", quant_algo="mse", max_seq_len=64, log=lambda _: None)
    assert resolve_engine(engine, quant_algo="mse") == engine
    with pytest.raises(ValueError, match="built with quant_algo=mse, not rtn"):
        resolve_engine(engine, quant_algo="rtn")
