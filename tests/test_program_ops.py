"""The engine loader's op allow-list (llmc/backends/allowed_ops.py) is exactly what llmc's pipeline emits.

Every tested architecture is built in every mode the tests build (dtypes, tp, pp, each quantization
mode, the FP8 KV cache; modes combined, `BUILDS`); each rank's program must call only allow-listed ops. A new pass or
architecture that emits a new op fails here: add the op to the category of llmc/backends/allowed_ops.py
whose rule it meets (or to none). To list what the tested builds call that the list lacks:

    PYTHONPATH=. python3 tests/test_program_ops.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ARCHITECTURES, make_checkpoint  # noqa: E402

# Every mode the tests build, each at least once per architecture, combined so that an architecture takes five
# builds rather than one per mode (a tiny build is mostly torch.export's trace: 2-3 s).
BUILDS = {
    "float32-pp2": dict(pp=2),
    "bfloat16-tp2-fp8-kv-fp8": dict(dtype="bfloat16", tp=2, quant="fp8", kv_cache_dtype="fp8"),
    "float16-nvfp4": dict(dtype="float16", quant="nvfp4"),
    "fp8-weight-only": dict(quant="fp8-weight-only"),  # at tp 1: a vocab-parallel embedding is not quantized
    "nvfp4-weight-only-kv-fp8": dict(quant="nvfp4-weight-only", kv_cache_dtype="fp8"),
}


def call_targets(program: dict) -> set[str]:
    return {node["target"] for node in program["nodes"] if node["op"] == "call_function"}


def program_ops(checkpoint: Path, out: Path, options: dict) -> set[str]:
    """The targets of every call in every rank program of `checkpoint` built with `options`."""
    import llmc

    engine = llmc.build(checkpoint, out, max_seq_len=64, calib_samples=2, log=lambda _: None, **options)
    return set().union(*(call_targets(json.loads(p.read_text())) for p in engine.glob("rank*/program.json")))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_programs_call_only_allow_listed_ops(arch, tmp_path):
    from llmc.backends import torch_backend
    from llmc.backends.allowed_ops import PROGRAM_OPS
    from llmc.backends.graph_format import graph_to_json
    from llmc.plugins.linear import PREPACKED

    # What loading inserts on CPU (prepacked linears) is never read from a file, so it is not in PROGRAM_OPS.
    load_time_ops = {str(prepacked) for prepacked, _ in PREPACKED.values()}
    checkpoint = make_checkpoint(arch, tmp_path / "checkpoint")
    for build, options in BUILDS.items():
        new = program_ops(checkpoint, tmp_path / build, options) - PROGRAM_OPS
        assert not new, (f"{arch} {build} calls ops the engine loader refuses: {sorted(new)}. Add each to the category of "
                         "llmc/backends/allowed_ops.py whose rule it meets")
        for rank_dir in (tmp_path / build).glob("rank*"):
            loaded = call_targets(graph_to_json(torch_backend.load_rank(rank_dir).graph))
            assert loaded <= PROGRAM_OPS | load_time_ops, f"{arch} {build}: loading inserts {sorted(loaded - PROGRAM_OPS)}"


class _AnyOp:
    """Lets the regenerating builds write programs with ops not yet on the list (torch_backend refuses them)."""

    def __contains__(self, op: str) -> bool:
        return True


def main(architectures=ARCHITECTURES, ops: set[str] = frozenset()) -> None:
    import time
    from unittest import mock

    from llmc.backends import torch_backend

    ops = set(ops)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(torch_backend, "PROGRAM_OPS", _AnyOp()):
        root = Path(tmp)
        for arch in architectures:
            checkpoint = make_checkpoint(arch, root / arch)
            for build, options in BUILDS.items():
                start = time.perf_counter()
                ops |= program_ops(checkpoint, root / f"{arch}-{build}", options)
                print(f"{arch} {build}: {time.perf_counter() - start:.1f} s, {len(ops)} ops so far", file=sys.stderr)
    from llmc.backends.allowed_ops import PROGRAM_OPS

    print("\n".join(sorted(ops - PROGRAM_OPS)) or "every op the tested builds call is allow-listed")


if __name__ == "__main__":
    main()
