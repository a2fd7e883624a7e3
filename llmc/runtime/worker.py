"""A rank: one process of a tp x ep x pp engine, running its program on every step it is sent.

Ranks are numbered pp_rank * (tp * ep) + ep_rank * tp + tp_rank, as their directories are. Every rank gets
each step's inputs from the driver; a pipeline stage after the first also receives the previous stage's
outputs (from the rank in its place there) and the last stage's first rank returns the logits. The
tensor-parallel ranks of a stage with one ep rank share a process group for their all-reduces; all of a
stage's ranks share another for the MoE layers' (docs/design.md, Parallelism).

Two ways to start ranks, one step: `LLM(engine)` starts them on this machine and talks to them over
pipes (`run_local_rank`, executor.MultiprocExecutor); `torchrun ... -m llmc.cli generate|serve ENGINE`
starts them on one machine or many: rank 0 runs the engine and sends steps to the others over
torch.distributed (`run_torchrun_rank`, executor.TorchrunExecutor).
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import threading
import traceback
from typing import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llmc.engine import EngineConfig
from llmc.open_runner import Runner, open_runner
from llmc.plugins import collectives


class RankWorker:
    def __init__(self, engine_dir: Path, config: EngineConfig, rank: int, num_blocks: int, device: str = "cpu"):
        tp, pp, stage = config.mapping["tp"], config.mapping["pp"], config.stage_ranks
        self.rank, self.stage = rank, stage
        self.pp_rank, self.stage_rank = divmod(rank, stage)  # stage_rank = ep_rank * tp + tp_rank
        self.is_last_stage = self.pp_rank == pp - 1
        # Every rank creates every group, in the same order (torch.distributed's rule): per stage, its tp
        # groups (one per ep rank; attention and dense layers), then the whole stage (MoE layers).
        for s in range(pp):
            for first in range(s * stage, (s + 1) * stage, tp):
                group = dist.new_group(list(range(first, first + tp)))
                if first <= rank < first + tp and tp > 1:
                    collectives.set_tensor_parallel_group(group)
            group = dist.new_group(list(range(s * stage, (s + 1) * stage)))
            if s == self.pp_rank and stage > 1:
                collectives.set_expert_parallel_group(group)
        self.device = torch.device(device)
        self.runner: Runner = open_runner(engine_dir, config, rank, num_blocks, self.device)
        self.receives = config.ranks[rank]["pp_inputs"]

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """Run one step; returns the logits [S, vocab] on the rank that has them, else None."""
        num_tokens = inputs["input_ids"].shape[-1]
        inputs = dict(inputs)
        for spec in self.receives:
            shape = [num_tokens if d == -1 else d for d in spec["shape"]]
            buf = torch.empty(shape, dtype=getattr(torch, spec["dtype"]))
            dist.recv(buf, src=self.rank - self.stage)
            inputs[spec["name"]] = buf
        outputs = self.runner.run(inputs)
        if not self.is_last_stage:
            for t in outputs:
                dist.send(t.contiguous(), dst=self.rank + self.stage)
            return None
        if self.stage_rank == 0:
            return outputs[0][0].float().numpy()
        return None


def init_process_group(rank: int, world_size: int, init_method: str | None, timeout: float) -> None:
    """gloo on CPU; a collective that waits longer than `timeout` seconds for a peer fails."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def _received(conn) -> Iterator[dict]:
    """Steps from the driver, read by a thread as they come: the driver never waits on a busy rank's
    pipe (and so never on a rank that waits for the driver to read its logits)."""
    steps: queue.Queue = queue.Queue()

    def read():
        while True:
            try:
                steps.put(conn.recv())
            except (EOFError, OSError):  # the driver is gone
                steps.put(None)
                return

    threading.Thread(target=read, daemon=True).start()
    while (inputs := steps.get()) is not None:
        yield inputs


def run_local_rank(rank, engine_dir, num_blocks, init_method, timeout, threads, conn) -> None:
    """Entry point of a rank started by `MultiprocExecutor`: steps in over `conn`; out, for each step,
    the logits from the rank that has them and None from the others (the driver counts finished steps)."""
    try:
        torch.set_num_threads(threads)
        config = EngineConfig.load(engine_dir)
        init_process_group(rank, config.world_size, init_method, timeout)
        worker = RankWorker(Path(engine_dir), config, rank, num_blocks)
        conn.send("ready")
        for inputs in _received(conn):
            conn.send(worker.step(inputs))
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # not a clean exit: peers blocked in a collective with this rank fail at once
    dist.destroy_process_group()


def torchrun_rank() -> int | None:
    """This process's rank if torchrun started it, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


class Messages:
    """Python objects between ranks over torch.distributed. Sends never block: a rank that sends
    logits to rank 0 goes on to its next step while rank 0 is still busy with stage 0."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.pending: list[tuple] = []  # (work, tensors kept alive until it completes)

    def send(self, obj, dst: int) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        self.pending = [p for p in self.pending if not p[0].is_completed()]
        for t in (size, payload):
            self.pending.append((dist.isend(t, dst, group=self.group), t))

    def recv(self, src: int):
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(payload, src, group=self.group)
        return pickle.loads(payload.numpy().tobytes())

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def join_torchrun(config: EngineConfig, timeout: float) -> Messages:
    world = int(os.environ["WORLD_SIZE"])
    if world != config.world_size:
        mapping = ", ".join(f"{k}={v}" for k, v in config.mapping.items() if k != "pp_layers")
        raise ValueError(
            f"the engine has {config.world_size} ranks ({mapping}) "
            f"but torchrun started {world}; give torchrun --nnodes x --nproc-per-node = {config.world_size}"
        )
    init_process_group(int(os.environ["RANK"]), world, "env://", timeout)
    return Messages(dist.new_group(backend="gloo"))


def run_torchrun_rank(engine_dir: str | Path, timeout: float = 60.0) -> None:
    """A rank other than 0 of a torchrun job: run the steps rank 0 sends until it says stop."""
    config = EngineConfig.load(engine_dir)
    messages = join_torchrun(config, timeout)
    num_blocks = messages.recv(0)
    worker = RankWorker(Path(engine_dir), config, dist.get_rank(), num_blocks)
    while (inputs := messages.recv(0)) is not None:
        logits = worker.step(inputs)
        if logits is not None:
            messages.send(logits, 0)
    messages.flush()
    dist.destroy_process_group()
