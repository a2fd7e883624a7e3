"""ONNX engines: the torch backend's logits and tokens through ONNX Runtime, valid ONNX, FP8 kept as FP8 and NVFP4 packed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB, step_inputs

import llmc
from llmc import LLM, SamplingParams
from llmc.backends import get_backend
from llmc.cli import main
from llmc.engine import EngineConfig, EngineError
from llmc.plugins.quant_formats import E2M1_MAX, E2M1_VALUES, NVFP4_BLOCK, fake_quantize_nvfp4_activation, nvfp4_global_scale
from llmc.runtime.sequence import Sequence

ARCHS = ["llama", "qwen2", "gpt_neox", "mistral", "gptj"]  # Mistral: a sliding window; GPT-J: interleaved RoPE
PROMPTS = [[1, 2, 3], list(range(10, 40)), [5] * 7, list(range(100, 117)), [200, 7, 9, 300, 11]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=4)
MAX_SEQ_LEN = 64
quiet = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory, llama_onnx_engine):
    """Per architecture: the ONNX engine, and a torch engine with the same cache blocks (one a sequence)."""
    root = tmp_path_factory.mktemp("onnx_engines")
    built = {}
    for arch in ARCHS:
        onnx = llama_onnx_engine if arch == "llama" else (  # the session's, of max_seq_len 64 (MAX_SEQ_LEN)
            llmc.build(checkpoints[arch], root / f"{arch}-onnx", max_seq_len=MAX_SEQ_LEN, backend="onnx", **quiet))
        built[arch] = {
            "onnx": onnx,
            "torch": llmc.build(checkpoints[arch], root / f"{arch}-torch", max_seq_len=MAX_SEQ_LEN, block_size=MAX_SEQ_LEN, **quiet),
        }
    return built


def _runner(engine, num_blocks=4):
    config = EngineConfig.load(engine)
    return get_backend(config.backend).make_runner(engine / "rank0", config, 0, num_blocks, torch.device("cpu"))


def _steps():
    """Three steps on cache rows 0-2: two prompts; their decodes with a third prompt's first chunk; all decodes
    with the chunk's rest."""
    a, b, c = (Sequence(p, PARAMS) for p in ([3, 1, 4, 1, 5], list(range(20, 31)), list(range(40, 53))))
    for row, seq in enumerate((a, b, c)):
        seq.block_table = [row]
    return step_inputs([[(a, 5), (b, 11)], [(a, 1), (b, 1), (c, 6)], [(b, 1), (a, 1), (c, 7)]], MAX_SEQ_LEN)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_logits_match_torch(arch, engines):
    """Ragged steps (prefills, decodes beside a prefill chunk, decodes out of row order) give the torch logits."""
    onnx_runner, torch_runner = _runner(engines[arch]["onnx"]), _runner(engines[arch]["torch"])
    for inputs in _steps():
        want, got = torch_runner.run(inputs)[0], onnx_runner.run(inputs)[0]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_engine_generates_torch_tokens(arch, engines):
    """Through the in-flight batching runtime: requests of different lengths join and leave mid-flight."""
    with LLM(engines[arch]["torch"], max_num_seqs=3) as llm:
        want = llm.generate(PROMPTS, PARAMS)
    with LLM(engines[arch]["onnx"], max_num_seqs=3) as llm:
        assert_same_outputs(want, llm.generate(PROMPTS, PARAMS))


def assert_same_outputs(want, got):
    """The same tokens, and the same top logprobs within 1e-4."""
    for a, b in zip(want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) <= 1e-4


def test_onnx_prompt_logprobs_and_samples_match_torch(engines):
    """Prompt logprobs (more logits rows than sequences in a step) and n samples of a prompt, as the torch engine's."""
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=3, n=2)
    outputs = {}
    for kind in ("torch", "onnx"):
        with LLM(engines["llama"][kind], max_num_seqs=3) as llm:
            outputs[kind] = llm.generate(PROMPTS, params)
    for want, got in zip(outputs["torch"], outputs["onnx"], strict=True):
        assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(got.prompt_token_ids)
        for x, y in zip(want.prompt_logprobs[1:], got.prompt_logprobs[1:], strict=True):
            assert x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) <= 1e-4
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs] and len(got.outputs) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_model_is_valid_onnx(arch, engines):
    path = engines[arch]["onnx"] / "rank0" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert all(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer if len(init.dims) == 2)
    ops = EngineConfig.load(engines[arch]["onnx"]).ranks[0]["backend"]["ops"]
    assert ops["com.microsoft::GroupQueryAttention"] == 2  # one per layer


def test_onnx_pipeline_parallel_matches(checkpoints, engines, tmp_path):
    engine = llmc.build(checkpoints["llama"], tmp_path / "pp2", max_seq_len=MAX_SEQ_LEN, backend="onnx", pp=2, **quiet)
    with LLM(engines["llama"]["onnx"]) as llm:
        want = llm.generate(PROMPTS, PARAMS)
    with LLM(engine, max_num_seqs=3) as llm:
        got = llm.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2-pp2"])
def test_onnx_tensor_parallel_generates_torch_tokens(tp, pp, checkpoints, engines, tmp_path):
    """Each rank's program runs as ONNX segments with its all-reduces and all-gather between them, over gloo between
    real rank processes: the single-rank torch engine's tokens and logprobs."""
    engine = llmc.build(checkpoints["llama"], tmp_path / "e", max_seq_len=MAX_SEQ_LEN, backend="onnx", tp=tp, pp=pp, **quiet)
    ranks = EngineConfig.load(engine).ranks
    gather = ranks[-1]["backend"]["program"][-1]
    assert (gather["collective"], gather["output"], gather["args"]) == ("llmc::all_gather", "logits", {"full_size": VOCAB})
    for info in ranks:  # the op histogram counts every segment
        assert info["backend"]["ops"]["com.microsoft::GroupQueryAttention"] == info["kv_cache"]["num_layers"]
    with LLM(engines["llama"]["torch"], max_num_seqs=3) as llm:
        want = llm.generate(PROMPTS, PARAMS)
    with LLM(engine, max_num_seqs=3) as llm:
        assert_same_outputs(want, llm.generate(PROMPTS, PARAMS))
    out = CliRunner().invoke(main, ["inspect", str(engine)]).output
    assert "llmc::all_reduce between segments (torch.distributed)" in out and f"{6 // pp} segment(s)" in out


def test_onnx_engine_without_a_program_is_a_clear_error(engines, tmp_path):
    """An engine from before segments: its rank record does not say which ONNX models to run."""
    engine = shutil.copytree(engines["llama"]["onnx"], tmp_path / "old")
    config = json.loads((engine / "config.json").read_text())
    del config["ranks"][0]["backend"]["program"]
    (engine / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=r"ranks\[0\]\.backend: program: Field required.*Rebuild the engine"):
        LLM(engine)


def test_onnx_bfloat16_is_a_clear_error(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="float32 or float16"):
        llmc.build(checkpoints["llama"], tmp_path / "bf16", backend="onnx", dtype="bfloat16", **quiet)


def test_inspect_shows_onnx_ops(engines):
    out = CliRunner().invoke(main, ["inspect", str(engines["llama"]["onnx"])]).output
    assert "onnx ops" in out and "com.microsoft::GroupQueryAttention 2" in out
    assert "llmc::paged_attention native (com.microsoft::GroupQueryAttention)" in out


def fp8_rank_graph(checkpoint):
    """The tiny Llama's rank graph through the whole pipeline with --quant fp8: every linear but the LM head
    and the embedding table in FP8, the linears' inputs with static scales (calibrated on one sample)."""
    from llmc.frontend.checkpoint import Checkpoint
    from llmc.frontend.export import trace
    from llmc.passes import PIPELINE, BuildContext, run_passes

    ckpt = Checkpoint(checkpoint)
    ctx = BuildContext(ckpt.config, torch.float32, MAX_SEQ_LEN, 64, 4, MAX_SEQ_LEN, quant_mode="fp8",
                       calibration_samples=[list(range(1, 40))])
    gm, _ = run_passes(trace(ckpt, torch.float32, 64, 4), ctx, PIPELINE)
    return gm, ctx


def test_fp8_onnx_keeps_float8_initializers(checkpoints, tmp_path):
    from llmc.backends.onnx_export import export_rank
    from llmc.passes.manager import example_step

    gm, ctx = fp8_rank_graph(checkpoints["llama"])
    record = export_rank(gm, tmp_path, ctx, form="onnxruntime")
    path = tmp_path / "model.onnx"
    assert record["lowered"]["llmc::fp8_linear"] == "native"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    fp8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    # Per layer qkv (merged), o, gate_up (merged) and down projections, and the embedding table.
    assert len(fp8) == 2 * 4 + 1
    assert record["ops"]["DequantizeLinear"] >= len(fp8) and record["ops"]["QuantizeLinear"] == 2 * 4
    # And it computes what the op computes: one prefill of 7 tokens.
    step = example_step(gm, dataclasses.replace(ctx, block_size=MAX_SEQ_LEN))
    with torch.no_grad():
        want = gm(**step)[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kv = ctx.kv_cache
    feeds = {"input_ids": step["input_ids"].numpy(), "position_ids": step["position_ids"].numpy(),
             "logits_indices": step["logits_indices"].numpy(), "seqlens_k": np.array([6], np.int32),
             "total_sequence_length": np.array(7, np.int32)}
    for i in range(kv["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, kv["num_kv_heads"], MAX_SEQ_LEN, kv["head_dim"]), np.float32)
    got = session.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]
    assert np.abs(got - want.numpy()).max() <= 1e-4


def quantized_engines(checkpoint, root, quant: str, tp: int = 1) -> dict:
    """The ONNX engine and the torch backend's (one cache block a sequence) of `checkpoint` quantized with
    `quant`, from the same calibration."""
    options = dict(max_seq_len=MAX_SEQ_LEN, quant=quant, calib_samples=2, tp=tp, **quiet)
    return {"onnx": llmc.build(checkpoint, root / f"{quant}-onnx", backend="onnx", **options),
            "torch": llmc.build(checkpoint, root / f"{quant}-torch", block_size=MAX_SEQ_LEN, **options)}


def assert_generates_alike(engines: dict):
    """The ONNX engine gives the torch engine's greedy tokens, their logprobs within 1e-4."""
    with LLM(engines["torch"]) as llm:
        expected = llm.generate(PROMPTS, PARAMS)
    with LLM(engines["onnx"]) as llm:
        assert_same_outputs(expected, llm.generate(PROMPTS, PARAMS))


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_onnx_engine_generates_torch_tokens(tp, checkpoints, tmp_path):
    """`llmc build --backend onnx --quant fp8 [--tp 2]`: FP8 weights stay FLOAT8E4M3FN in every segment, and ONNX
    Runtime gives the torch backend's FP8 engine's tokens."""
    engines = quantized_engines(checkpoints["qwen2"], tmp_path, "fp8", tp)
    for rank in range(tp):
        models = [onnx.load(str(f), load_external_data=False) for f in (engines["onnx"] / f"rank{rank}").glob("*.onnx")]
        fp8 = [i for m in models for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        # Per layer qkv (merged), o, gate_up (merged) and down projections; the table too where it is not vocab-parallel.
        assert len(fp8) == 2 * 4 + (tp == 1)
    assert_generates_alike(engines)


NVFP4_MODES = ["nvfp4-weight-only", "nvfp4"]


@pytest.fixture(scope="module")
def nvfp4_engines(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("nvfp4_engines")
    return {mode: quantized_engines(checkpoints["qwen2"], root, mode) for mode in NVFP4_MODES}


@pytest.mark.parametrize("mode", NVFP4_MODES)
def test_nvfp4_onnx_engine_generates_torch_tokens(mode, nvfp4_engines):
    """`llmc build --backend onnx --quant nvfp4[-weight-only]`: ONNX Runtime gives the torch backend's NVFP4 engine's
    tokens. Both decode the same packed weights exactly and (W4A4) quantize activations identically, so only the order
    of fp32 sums differs: logprobs differ by at most 5e-7 here (measured, both modes). The tolerance is the fp32 and
    FP8 tests' 1e-4: another CPU sums in other orders, and under W4A4 an ulp can move an activation across an E2M1
    rounding tie."""
    assert_generates_alike(nvfp4_engines[mode])


def _packed_weights(model: onnx.ModelProto) -> dict[str, tuple[list[int], list[int]]]:
    """Each UINT8 initializer's dims and those of its FLOAT8E4M3FN block scales, by name."""
    initializers = {i.name: i for i in model.graph.initializer}
    return {name: (list(i.dims), list(initializers[name + "_block_scale"].dims))
            for name, i in initializers.items() if i.data_type == onnx.TensorProto.UINT8}


@pytest.mark.parametrize("mode", NVFP4_MODES)
def test_nvfp4_onnx_keeps_weights_packed(mode, nvfp4_engines, tmp_path):
    """Each NVFP4 weight stays a UINT8 initializer of K/2 bytes a row beside its E4M3 block scales (K/16 a row): in the
    ONNX file (nothing folded them into floats) and in ONNX Runtime once it has loaded and optimized the model."""
    path = nvfp4_engines[mode]["onnx"] / "rank0" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    packed = _packed_weights(model)
    # Per layer the merged q/k/v, o, merged gate/up and down projections, and the embedding table.
    assert len(packed) == 2 * 4 + 1
    assert all(rows == scale_rows and per_row == 8 * scales_per_row  # K/2 = 8 x K/16
               for (rows, per_row), (scale_rows, scales_per_row) in packed.values())
    floats = [list(i.dims) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert floats == [[64, VOCAB]]  # only the LM head, kept by --exclude lm_head
    lowered = EngineConfig.load(nvfp4_engines[mode]["onnx"]).ranks[0]["backend"]["lowered"]
    assert lowered["llmc::nvfp4_linear"] == lowered["llmc::nvfp4_embedding"] == "native"

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert _packed_weights(onnx.load(options.optimized_model_filepath, load_external_data=False)) == packed


def _onnx_runtime_activation_quantizer(k: int):
    """The W4A4 lowering's activation quantization alone (onnx_export.fake_quantize_nvfp4) in an ONNX Runtime session:
    exported as the translation of an llmc::nvfp4_linear whose square weight gives the op the activation's shape."""
    from llmc.backends.onnx_export import OPSET, fake_quantize_nvfp4

    weight, block_scale = torch.zeros(k, k // 2, dtype=torch.uint8), torch.zeros(k, k // 16, dtype=torch.float8_e4m3fn)

    class W4A4Input(torch.nn.Module):
        def forward(self, x, global_scale):
            return torch.ops.llmc.nvfp4_linear(x, weight, block_scale, global_scale, global_scale, None)

    def activation_only(x, weight, weight_scale, weight_global_scale, input_global_scale, bias=None):
        return fake_quantize_nvfp4(x, input_global_scale)

    program = torch.onnx.export(
        W4A4Input().eval(), (torch.zeros(2, k), torch.tensor(1.0)), dynamic_shapes=({0: torch.export.Dim("rows")}, None),
        opset_version=OPSET, custom_translation_table={torch.ops.llmc.nvfp4_linear.default: activation_only},
        dynamo=True, optimize=False, verbose=False,
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def quantize(x, global_scale):
        return torch.from_numpy(session.run(None, dict(zip(names, (x.numpy(), global_scale.numpy()))))[0])

    return quantize


def test_nvfp4_activation_lowering_is_bit_exact():
    """W4A4's activation quantization as lowered, run by ONNX Runtime, equals fake_quantize_nvfp4_activation bit for bit
    in fp32 (signed zeros included): every E2M1 rounding tie and one fp32 step either side, under exact block scales
    2^-4..2^4; random blocks of magnitudes 1e-3..1e3, an all-zero and an all -0.0 block, tiny negatives that round to
    -0; with the calibrated global scale and one 8x smaller, under which block scales saturate at E4M3's 448."""
    from test_quant_formats import sweep

    quantize = _onnx_runtime_activation_quantizer(NVFP4_BLOCK)
    ties = torch.from_numpy(sweep(np.array(E2M1_VALUES))).reshape(-1, NVFP4_BLOCK - 1)
    ties = torch.cat([torch.full((len(ties), 1), E2M1_MAX), ties], dim=1)  # amax 6 (or a step above): block scale 1
    ties = torch.cat([ties * 2.0**k for k in range(-4, 5)])
    torch.manual_seed(0)
    noise = torch.randn(64, NVFP4_BLOCK) * 10.0 ** torch.empty(64, 1).uniform_(-3, 3)
    noise[0], noise[1], noise[2, :8] = 0.0, -0.0, -1e-30
    calibrated = nvfp4_global_scale(noise)
    for x, global_scale in ((ties, torch.tensor(1.0)), (noise, calibrated), (noise, calibrated / 8)):
        want = fake_quantize_nvfp4_activation(x, global_scale)
        assert torch.equal(quantize(x, global_scale).view(torch.int32), want.view(torch.int32))
