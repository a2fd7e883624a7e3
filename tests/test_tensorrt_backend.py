"""TensorRT engines: built from the standard ONNX form (which, run on ONNX Runtime, gives the torch
backend's tokens), with the builder's version and target recorded and checked on load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import llmc
from llmc import LLM, SamplingParams
from llmc.backends import tensorrt_backend
from llmc.cli import main
from llmc.engine import EngineConfig, EngineError

from test_onnx_backend import MAX_SEQ_LEN, PROMPTS, fp8_rank_graph

PARAMS = SamplingParams(max_tokens=8, temperature=0)
quiet = dict(log=lambda _: None)


@pytest.fixture(scope="module")
def trt_engine(checkpoints, tmp_path_factory):
    return llmc.build(checkpoints["llama"], tmp_path_factory.mktemp("trt") / "llama", max_seq_len=MAX_SEQ_LEN,
                      backend="tensorrt", **quiet)


def _trt():
    return tensorrt_backend.builder()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorrt_engine_builds(dtype, checkpoints, trt_engine, tmp_path):
    engine = trt_engine if dtype == "float32" else llmc.build(
        checkpoints["llama"], tmp_path / dtype, max_seq_len=MAX_SEQ_LEN, dtype=dtype, backend="tensorrt", **quiet)
    record = json.loads((engine / "config.json").read_text())["ranks"][0]["backend"]
    [built] = record["tensorrt"]
    assert built["package"] == _trt().__name__ and built["version"] == _trt().__version__
    data = (engine / "rank0" / "model.engine").read_bytes()
    assert len(data) == built["engine_bytes"] > 0
    trt = _trt()
    if torch.cuda.is_available():
        assert trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(data) is not None
    else:  # deserializing needs a GPU: llmc says so rather than failing inside TensorRT
        with pytest.raises(EngineError, match="runs only on an NVIDIA GPU, and this machine has none"):
            LLM(engine)


@pytest.fixture(scope="module")
def torch_tokens(llama_engine):
    return _tokens(llama_engine)  # max_seq_len 64, as MAX_SEQ_LEN


def _tokens(engine):
    with LLM(engine, max_num_seqs=3) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def _tokens_on_onnx_runtime(trt_engine, tmp_path):
    """The tokens of the ONNX the engine was built from, run by ONNX Runtime (its ops are all standard)."""
    as_onnx = shutil.copytree(trt_engine, tmp_path / "as-onnx")
    config = json.loads((as_onnx / "config.json").read_text())
    config["backend"] = "onnx"
    config["files"] = {rel: digest for rel, digest in config["files"].items() if not rel.endswith(".engine")}
    (as_onnx / "config.json").write_text(json.dumps(config))
    return _tokens(as_onnx)


def test_standard_onnx_form_matches_torch(trt_engine, torch_tokens, tmp_path):
    assert _tokens_on_onnx_runtime(trt_engine, tmp_path) == torch_tokens
    ops = json.loads((trt_engine / "config.json").read_text())["ranks"][0]["backend"]["ops"]
    assert not [op for op in ops if "::" in op]  # no custom domain: TensorRT's parser takes it


def test_tensor_parallel_builds_an_engine_per_segment(checkpoints, torch_tokens, tmp_path):
    """--tp 2: each rank's program is split at its collectives and each segment built into its own engine; the
    segments' ONNX, run by ONNX Runtime in two rank processes, gives the torch tokens."""
    engine = llmc.build(checkpoints["llama"], tmp_path / "tp2", max_seq_len=MAX_SEQ_LEN, backend="tensorrt", tp=2, **quiet)
    for rank, info in enumerate(EngineConfig.load(engine).ranks):
        record = info["backend"]
        # Split after the embedding's all-reduce, each layer's two all-reduces and the LM head's all-gather.
        assert [part["onnx"] for part in record["program"] if "onnx" in part] == [f"segment{i}.onnx" for i in range(6)]
        assert [built["engine"] for built in record["tensorrt"]] == [f"segment{i}.engine" for i in range(6)]
        for built in record["tensorrt"]:
            assert (engine / f"rank{rank}" / built["engine"]).stat().st_size == built["engine_bytes"] > 0
    assert _tokens_on_onnx_runtime(engine, tmp_path) == torch_tokens


def test_engine_from_another_tensorrt_is_a_clear_error(trt_engine, tmp_path):
    engine = shutil.copytree(trt_engine, tmp_path / "old")
    config = json.loads((engine / "config.json").read_text())
    config["ranks"][0]["backend"]["tensorrt"][0]["version"] = "0.9.0"
    (engine / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match=r"built with tensorrt\w* 0\.9\.0 but this machine has .*rebuild the engine here"):
        LLM(engine)


def test_inspect_shows_tensorrt_build(trt_engine):
    out = CliRunner().invoke(main, ["inspect", str(trt_engine)]).output
    assert f"tensorrt           {_trt().__name__} {_trt().__version__}" in out and "layers" in out
    assert "ScatterElements" in out


def test_fp8_onnx_builds_in_tensorrt(checkpoints, tmp_path):
    """FP8 Q/DQ in the standard form: the builder takes FLOAT8E4M3FN weights and activations."""
    from llmc.backends.onnx_export import export_rank

    gm, ctx = fp8_rank_graph(checkpoints["llama"])
    export_rank(gm, tmp_path, ctx, form="standard")
    built = tensorrt_backend.build_engine(tmp_path / "model.onnx", tmp_path / "model.engine", max_tokens=64, max_seqs=4)
    assert built["engine_bytes"] > 0


@pytest.mark.parametrize("mode", ["nvfp4-weight-only", "nvfp4"])
def test_nvfp4_tensorrt_engine_builds(mode, checkpoints, tmp_path):
    """`llmc build --backend tensorrt --quant nvfp4[-weight-only]`: TensorRT builds the standard form's FP4 decoding (UINT8
    initializers cast to table indices, Gather; W4A4's activation Q/DQ and rounding), which ONNX Runtime runs to the torch
    NVFP4 engine's tokens."""
    options = dict(max_seq_len=MAX_SEQ_LEN, quant=mode, calib_samples=2, **quiet)
    engine = llmc.build(checkpoints["llama"], tmp_path / "trt", backend="tensorrt", **options)
    record = json.loads((engine / "config.json").read_text())["ranks"][0]["backend"]
    assert record["lowered"]["llmc::nvfp4_linear"] == record["lowered"]["llmc::nvfp4_embedding"] == "native"
    [built] = record["tensorrt"]
    assert (engine / "rank0" / "model.engine").stat().st_size == built["engine_bytes"] > 0
    torch_engine = llmc.build(checkpoints["llama"], tmp_path / "torch", **options)
    assert _tokens_on_onnx_runtime(engine, tmp_path) == _tokens(torch_engine)
