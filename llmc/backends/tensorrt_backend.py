"""The TensorRT backend: each rank's program in the standard ONNX form (onnx_export), each of its ONNX
models parsed and built into a serialized TensorRT engine beside it: `rankN/model.engine`, or with
--tp one engine a segment, `rankN/segment0.engine` ... (the collectives between them are the runtime's).

The builder is `tensorrt` where it is installed, else `tensorrt_rtx` (which builds without a GPU).
Optimization profiles cover the step shapes: 1..max_batch_tokens new tokens, 1..max_num_seqs
sequences (cache rows) a call. Each rank's record holds the builder's package, version and target,
so loading checks them first: an engine only runs on the TensorRT that built it, on a GPU.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from llmc.backends.onnx_backend import check_build as check_onnx_build, rank_files as onnx_rank_files
from llmc.engine_error import EngineError

if TYPE_CHECKING:
    from llmc.engine import EngineConfig

BUILDERS = ("tensorrt", "tensorrt_rtx")


def check_build(dtype: str, tp: int, max_seq_len: int, block_size: int, kv_cache_dtype: str | None = None) -> None:
    check_onnx_build(dtype, tp, max_seq_len, block_size, kv_cache_dtype)
    builder()


def builder():
    """The TensorRT Python package to build with."""
    for name in BUILDERS:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ValueError("the TensorRT backend needs `tensorrt` or `tensorrt_rtx`: pip install 'llmc[tensorrt]'")


def rank_files(record: dict) -> tuple[set[str], set[str]]:
    """A rank directory's files: the ONNX form's, and the TensorRT engine built from each of its models."""
    required, optional = onnx_rank_files(record)
    return required | {built["engine"] for built in record["tensorrt"]}, optional


def write_rank(gm, rank_dir: Path, ctx) -> dict:
    from llmc.backends.onnx_export import export_rank

    record = export_rank(gm, rank_dir, ctx, form="standard")
    record["tensorrt"] = [
        build_engine(rank_dir / part["onnx"], rank_dir / Path(part["onnx"]).with_suffix(".engine").name,
                     max_tokens=ctx.max_batch_tokens, max_seqs=ctx.max_num_seqs)
        for part in record["program"] if "onnx" in part
    ]
    return record


def build_engine(onnx_path: Path, out: Path, *, max_tokens: int, max_seqs: int) -> dict:
    """Parse `onnx_path`, build and serialize it to `out`; returns the build summary."""
    trt = builder()
    start = time.perf_counter()
    logger = _Log(trt)
    b = trt.Builder(logger)
    network = b.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = b.create_builder_config()
    profile = b.create_optimization_profile()
    ranges = {"num_tokens": (1, min(16, max_tokens), max_tokens), "batch": (1, min(4, max_seqs), max_seqs),
              "num_logits": (1, min(4, max_seqs), max_seqs)}
    dynamic = _dynamic_dims(onnx_path)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        shapes = [[ranges[dynamic[tensor.name][axis]][k] if d < 0 else d for axis, d in enumerate(dims)] for k in range(3)]
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    serialized = b.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build {onnx_path}: {'; '.join(logger.errors) or 'no error given'}")
    out.write_bytes(bytes(serialized))
    return {
        "engine": out.name,
        "package": trt.__name__,
        "version": trt.__version__,
        "target": [str(config.get_compute_capability(i)) for i in range(getattr(config, "num_compute_capabilities", 0))]
        or "builder default",
        "layers": network.num_layers,
        "inputs": network.num_inputs,
        "outputs": network.num_outputs,
        "engine_bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
        "warnings": len(logger.warnings),
        "first_warnings": logger.warnings[:3],
    }


def _dynamic_dims(onnx_path: Path) -> dict[str, dict[int, str]]:
    """Each input's dynamic axes, by the names onnx_export gives them (num_tokens, num_logits, batch)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: {axis: d.dim_param for axis, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param}
            for i in graph.input}


def _Log(trt):
    class Log(trt.ILogger):
        def __init__(self):
            super().__init__()
            self.errors, self.warnings = [], []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return Log()


def load_engines(rank_dir: Path, record: dict) -> list:
    """The rank's deserialized engines (their list checked by the engine's schema); a clear EngineError where this
    machine cannot run them."""
    return [_load_engine(rank_dir, built) for built in record["tensorrt"]]


def _load_engine(rank_dir: Path, built: dict):
    path, package, version = rank_dir / built["engine"], built["package"], built["version"]
    try:
        trt = importlib.import_module(package)
    except ImportError:
        raise EngineError(f"{path} is a TensorRT engine built with {package} {version}, which is not installed here; "
                          f"install that version or rebuild the engine here with --backend tensorrt") from None
    if trt.__version__ != version:
        raise EngineError(f"{path} was built with {package} {version} but this machine has {trt.__version__}; "
                          "TensorRT engines load only on the version that built them: rebuild the engine here")
    if not torch.cuda.is_available():
        raise EngineError(f"{path} is a TensorRT engine (target {built['target']}): it runs only on an "
                          "NVIDIA GPU, and this machine has none. Run it on a GPU machine, or build with --backend onnx "
                          "(ONNX Runtime runs on CPU)")
    logger = _Log(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(f"TensorRT could not load {path} on this GPU (target {built['target']}): "
                          f"{'; '.join(logger.errors) or 'no error given'}; rebuild the engine here")
    return engine


def make_runner(rank_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: torch.device) -> NoReturn:
    load_engines(rank_dir, config.ranks[rank]["backend"])
    raise EngineError(
        f"the TensorRT engines of {rank_dir} load, but llmc's runtime has no TensorRT step runner yet (no GPU was available "
        "to develop one): run the engines with TensorRT directly, or build with --backend onnx"
    )
