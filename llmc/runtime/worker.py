"""A rank: one process of a tp x pp engine, running its program on every step it is sent.

Ranks are numbered pp_rank * tp + tp_rank, as their directories are. Every rank gets each step's
inputs from the driver; a pipeline stage after the first also receives the previous stage's outputs
(from the rank with its tp_rank there) and the last stage's tp rank 0 returns the logits. The
tensor-parallel ranks of a stage share a process group for their all-reduces.

Two ways to start ranks, one loop: `LLM(engine)` starts them on this machine and talks to them over
pipes (executor.py); `torchrun ... -m llmc.runtime.worker ENGINE` starts them on many machines, and
rank 0 then drives the rest (see `serve_torchrun`).
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmc.backends import get_backend
from llmc.engine import EngineConfig
from llmc.plugins import collectives
from llmc.runtime.model_runner import ModelRunner


class RankWorker:
    def __init__(self, engine_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: str = "cpu"):
        tp, pp = config.mapping["tp"], config.mapping["pp"]
        self.rank, self.tp = rank, tp
        self.pp_rank, self.tp_rank = divmod(rank, tp)
        self.is_last_stage = self.pp_rank == pp - 1
        # Every rank creates every group, in the same order (torch.distributed's rule).
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)] if dist.is_initialized() else None
        collectives.set_tensor_parallel_group(groups[self.pp_rank] if groups and tp > 1 else None)
        self.device = torch.device(device)
        program = get_backend(config.backend).load_rank(engine_dir / f"rank{rank}", self.device)
        self.runner = ModelRunner(program, config, rank, num_blocks, self.device)
        self.receives = config.ranks[rank]["pp_inputs"]

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """Run one step; returns the logits [S, vocab] on the rank that has them, else None."""
        num_tokens = inputs["input_ids"].shape[-1]
        inputs = dict(inputs)
        for spec in self.receives:
            shape = [num_tokens if d == -1 else d for d in spec["shape"]]
            buf = torch.empty(shape, dtype=getattr(torch, spec["dtype"]))
            dist.recv(buf, src=self.rank - self.tp)
            inputs[spec["name"]] = buf
        outputs = self.runner.run(inputs)
        if not self.is_last_stage:
            for t in outputs:
                dist.send(t.contiguous(), dst=self.rank + self.tp)
            return None
        if self.tp_rank == 0:
            return outputs[0][0].float().numpy()
        return None


def init_process_group(rank: int, world_size: int, init_method: str | None, timeout: float) -> None:
    """gloo on CPU; a collective that waits longer than `timeout` seconds for a peer fails."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def run_local_rank(rank, engine_dir, num_blocks, init_method, timeout, threads, conn) -> None:
    """Entry point of a rank started by `MultiprocExecutor`: steps in and logits out over `conn`."""
    try:
        torch.set_num_threads(threads)
        config = EngineConfig.load(engine_dir)
        init_process_group(rank, config.world_size, init_method, timeout)
        worker = RankWorker(Path(engine_dir), config, rank, num_blocks)
        conn.send("ready")
        while True:
            try:
                inputs = conn.recv()
            except EOFError:  # the driver is gone
                break
            if inputs is None:
                break
            logits = worker.step(inputs)
            if logits is not None:
                conn.send(logits)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # not a clean exit: peers blocked in a collective with this rank fail at once
    dist.destroy_process_group()
