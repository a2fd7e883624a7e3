"""The runtime's one door to the backends: open a rank's runner, by the backend its engine names.

Its own module, outside llmc.backends and llmc.runtime, so that neither imports the other (docs/design.md, the
layers): the runtime imports this, and sees a backend only as the `Runner` it returns.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmc.backends import get_backend
from llmc.backends.base import Runner
from llmc.engine import EngineConfig

__all__ = ["Runner", "open_runner"]


def open_runner(engine_dir: str | Path, config: EngineConfig, rank: int, num_blocks: int,
                device: torch.device | str = "cpu") -> Runner:
    """Rank `rank` of the engine in engine_dir, on device, with a KV cache of num_blocks blocks."""
    return get_backend(config.backend).make_runner(Path(engine_dir) / f"rank{rank}", config, rank, num_blocks,
                                                   torch.device(device))
