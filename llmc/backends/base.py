"""The backend contract (docs/design.md, "Backends"): what every backend, and every runner it opens, implements.

A backend is a module registered in `llmc.backends.BACKENDS`: a module implements a Protocol with its functions
(PEP 544), so a backend needs no class. The compiler calls `check_build` and `write_rank`, `llmc.engine` calls
`rank_files` to check an engine's file list, and `llmc.open_runner` calls `make_runner` for each rank the runtime
runs. The runtime holds what it gets as a `Runner` and calls nothing else on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:  # annotations only: llmc.engine imports the backends (docs/design.md, the layers)
    import torch.fx as fx

    from llmc.engine import EngineConfig

StepInputs = Mapping[str, "np.ndarray | torch.Tensor"]


@runtime_checkable
class Runner(Protocol):
    """One rank's program, loaded on a device, with its slice of the KV cache."""

    def run(self, step_inputs: StepInputs) -> tuple[torch.Tensor, ...]:
        """One step of the step contract (docs/design.md): the rank's outputs, logits [1, S, vocab] on the last
        pipeline stage, else the values it sends to the next stage. Writes the step's tokens into the KV cache."""
        ...


@runtime_checkable
class Backend(Protocol):
    def check_build(self, dtype: str, tp: int, max_seq_len: int, block_size: int,
                    kv_cache_dtype: str | None = None) -> None:
        """Raise ValueError for a build this backend cannot express (before any tracing or calibration)."""
        ...

    def write_rank(self, gm: fx.GraphModule, rank_dir: Path, ctx: Any) -> dict | None:
        """Write a rank's files under rank_dir (ctx: the build's pass context, llmc/passes/manager.py); returns the
        rank's record (config.json's ranks[].backend), or None."""
        ...

    def rank_files(self, record: dict) -> tuple[set[str], set[str]]:
        """A rank directory's files, from its record: those it must have, and those it may have."""
        ...

    def make_runner(self, rank_dir: Path, config: EngineConfig, rank: int, num_blocks: int,
                    device: torch.device) -> Runner:
        """The rank's runner on device, its KV cache num_blocks blocks; EngineError where this machine cannot run it."""
        ...


def first_token_step() -> dict[str, np.ndarray | torch.Tensor]:
    """The step inputs of one sequence's first token (token 0, in cache block 0): the step a runner can be probed
    with as it loads, without the runtime's scheduler."""
    return {
        "input_ids": np.zeros((1, 1), dtype=np.int64),
        "position_ids": np.zeros((1, 1), dtype=np.int64),
        "rope_seq_lens": np.ones((1, 1), dtype=np.int64),
        "logits_indices": np.zeros(1, dtype=np.int64),
        "slot_mapping": np.zeros(1, dtype=np.int64),
        "block_tables": np.zeros((1, 1), dtype=np.int32),
        "seq_lens": np.ones(1, dtype=np.int32),
        "query_start_loc": np.array([0, 1], dtype=np.int32),
    }
