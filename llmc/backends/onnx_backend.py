"""The ONNX backend: each rank's program as ONNX models (weights as external data), run by ONNX Runtime
(onnx_runner.py). The program is written by onnx_export.py in its "onnxruntime" form."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmc.backends.onnx_program import DTYPES
from llmc.backends.onnx_runner import OnnxRunner

if TYPE_CHECKING:
    from llmc.engine import EngineConfig


def check_build(dtype: str, tp: int, max_seq_len: int, block_size: int, kv_cache_dtype: str | None = None) -> None:
    """Raise ValueError for a build the ONNX form cannot express (before any tracing or calibration)."""
    if dtype not in DTYPES:
        raise ValueError(f"the ONNX backend builds float32 or float16 engines, not {dtype}; give --dtype float32 or float16")
    if kv_cache_dtype is not None:
        raise ValueError(f"the ONNX backend has no {kv_cache_dtype} KV cache; build without --kv-cache-dtype, or with --backend torch")


def rank_files(record: dict) -> tuple[set[str], set[str]]:
    """A rank directory's files: its ONNX models, and (where a model has weights) their external data."""
    models = {part["onnx"] for part in record["program"] if "onnx" in part}
    return models, {f"{model}.data" for model in models}


def write_rank(gm, rank_dir: Path, ctx) -> dict:
    from llmc.backends.onnx_export import export_rank

    return export_rank(gm, rank_dir, ctx, form="onnxruntime")


def make_runner(rank_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: torch.device) -> OnnxRunner:
    return OnnxRunner(rank_dir, config, rank, num_blocks, torch.device(device))
