"""Backends turn each rank's graph into files, and run those files on the runtime's step inputs.

A backend module has `check_build(dtype, tp, max_seq_len, block_size, kv_cache_dtype)` (raises for a build it cannot
express), `write_rank(gm, rank_dir, ctx) -> record | None` (the record goes in the rank's entry of
config.json), and `make_runner(rank_dir, config, rank, num_blocks, device)`: an object whose
`run(step_inputs)` returns the rank's outputs (logits [1, S, vocab] on the last pipeline stage).
"""

from llmc.backends import onnx_backend, tensorrt_backend, torch_backend

BACKENDS = {"torch": torch_backend, "onnx": onnx_backend, "tensorrt": tensorrt_backend}
# Backends whose programs hold one cache row per sequence (block_size = max_seq_len).
CONTIGUOUS_CACHE = {"onnx", "tensorrt"}


def get_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]
