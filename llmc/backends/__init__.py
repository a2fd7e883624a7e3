"""Backends turn each rank's graph into files, and open a runner that runs those files on the step inputs.

Each backend implements `Backend` and its runners `Runner` (llmc/backends/base.py, docs/design.md "Backends").
Nothing here imports the runtime; the runtime reaches a backend only through llmc/open_runner.py.
"""

from llmc.backends import onnx_backend, tensorrt_backend, torch_backend
from llmc.backends.base import Backend

BACKENDS: dict[str, Backend] = {"torch": torch_backend, "onnx": onnx_backend, "tensorrt": tensorrt_backend}
# Backends whose programs hold one cache row per sequence (block_size = max_seq_len).
CONTIGUOUS_CACHE = {"onnx", "tensorrt"}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
