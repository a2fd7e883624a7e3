"""ONNX engines: the torch backend's logits and tokens through ONNX Runtime, valid ONNX, FP8 kept as FP8."""

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
from llmc.runtime.sequence import Sequence

ARCHS = ["llama", "qwen2", "gpt_neox", "mistral", "gptj"]  # Mistral: a sliding window; GPT-J: interleaved RoPE
PROMPTS = [[1, 2, 3], list(range(10, 40)), [5] * 7, list(range(100, 117)), [200, 7, 9, 300, 11]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, logprobs=4)
MAX_SEQ_LEN = 64
quiet = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    """Per architecture: the ONNX engine, and a torch engine with the same cache blocks (one a sequence)."""
    root = tmp_path_factory.mktemp("onnx_engines")
    built = {}
    for arch in ARCHS:
        built[arch] = {
            "onnx": llmc.build(checkpoints[arch], root / f"{arch}-onnx", max_seq_len=MAX_SEQ_LEN, backend="onnx", **quiet),
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
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and max(abs(x[t] - y[t]) for t in x) <= 1e-4


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
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


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
    with pytest.raises(EngineError, match="has no ONNX program.*rebuild the engine"):
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


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_onnx_engine_generates_torch_tokens(tp, checkpoints, tmp_path):
    """`llmc build --backend onnx --quant fp8 [--tp 2]`: FP8 weights stay FLOAT8E4M3FN in every segment, and ONNX
    Runtime gives the torch backend's FP8 engine's tokens."""
    options = dict(max_seq_len=MAX_SEQ_LEN, quant="fp8", calib_samples=2, tp=tp, **quiet)
    onnx_engine = llmc.build(checkpoints["qwen2"], tmp_path / "onnx", backend="onnx", **options)
    torch_engine = llmc.build(checkpoints["qwen2"], tmp_path / "torch", block_size=MAX_SEQ_LEN, **options)
    for rank in range(tp):
        models = [onnx.load(str(f), load_external_data=False) for f in (onnx_engine / f"rank{rank}").glob("*.onnx")]
        fp8 = [i for m in models for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        # Per layer qkv (merged), o, gate_up (merged) and down projections; the table too where it is not vocab-parallel.
        assert len(fp8) == 2 * 4 + (tp == 1)
    with LLM(torch_engine) as llm:
        expected = llm.generate(PROMPTS, PARAMS)
    with LLM(onnx_engine) as llm:
        assert_same_outputs(expected, llm.generate(PROMPTS, PARAMS))


def test_onnx_nvfp4_is_a_clear_error(checkpoints, tmp_path):
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["build", str(checkpoints["llama"]), "-o", str(out), "--backend", "onnx",
                                       "--quant", "nvfp4-weight-only", "--max-seq-len", "64"])
    assert result.exit_code != 0 and "no CPU kernels for FP4" in result.output and "--quant fp8" in result.output
    assert not out.exists()
