"""Executors run steps on an engine's ranks: in this process (one rank), or in one process per rank.

Both take a step's inputs with `submit` and hand back logits in submission order with `result`, so
the engine can keep several steps in flight (one per pipeline stage) and stages work at once.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections import deque
from multiprocessing import connection
from pathlib import Path

import multiprocessing as mp
import numpy as np
import torch
import torch.distributed as dist

from llmc.backends import get_backend
from llmc.engine import EngineConfig


class RankError(RuntimeError):
    """A rank died, hung, or failed; every rank has been stopped."""


class Executor:
    def submit(self, inputs: dict[str, np.ndarray]) -> None:
        """Start a step."""
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        """The oldest unfinished step's logits [S, vocab], float32 on the CPU."""
        raise NotImplementedError

    def execute(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        self.submit(inputs)
        return self.result()

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    """A single-rank engine, run in this process on `device`."""

    def __init__(self, engine_dir: Path, config: EngineConfig, num_blocks: int, device: torch.device):
        self.runner = get_backend(config.backend).make_runner(engine_dir / "rank0", config, 0, num_blocks, device)
        self._results: deque[torch.Tensor] = deque()

    def submit(self, inputs: dict[str, np.ndarray]) -> None:
        self._results.append(self.runner.run(inputs)[0][0])

    def result(self) -> torch.Tensor:
        return self._results.popleft().float().cpu()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(Executor):
    """A tp x pp engine on this machine: one process per rank, started here and stopped with the engine.

    If a rank dies or sends nothing for `rank_timeout` seconds, `result` stops every rank and
    raises RankError naming what happened.
    """

    def __init__(self, engine_dir: Path, config: EngineConfig, num_blocks: int, rank_timeout: float, load_timeout: float = 600):
        from llmc.runtime.worker import run_local_rank

        self.rank_timeout = rank_timeout
        world = config.world_size
        tp, pp = config.mapping["tp"], config.mapping["pp"]
        self.output_rank = (pp - 1) * tp  # the last stage's tensor-parallel rank 0
        # forkserver: ranks fork from a process that has imported torch once, not each its own.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["llmc.runtime.worker"])
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = max(1, (os.cpu_count() or 1) // world)
        self.procs, self.conns = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_local_rank,
                args=(rank, str(engine_dir), num_blocks, init_method, rank_timeout, threads, child),
                name=f"llmc-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        # Also when the engine is garbage-collected without a shutdown.
        self._stop = weakref.finalize(self, _stop_ranks, list(self.procs), list(self.conns))
        for rank in range(world):
            self._receive(rank, load_timeout, "load the engine")

    def _receive(self, rank: int, timeout: float, doing: str):
        conn = self.conns[rank]
        deadline = time.monotonic() + timeout
        while True:
            ready = connection.wait([conn] + [p.sentinel for p in self.procs], timeout=max(0.0, deadline - time.monotonic()))
            if conn in ready:
                try:
                    return conn.recv()
                except EOFError:
                    pass  # it died: reported below
            dead = [f"rank {i} (pid {p.pid}) exited with code {p.exitcode}" for i, p in enumerate(self.procs) if not p.is_alive()]
            if dead or not ready:
                self.shutdown()
                why = "; ".join(dead) if dead else f"rank {rank} did not {doing} within {timeout:g} s (hung?)"
                raise RankError(f"{why}; all ranks were stopped (their errors are above, on stderr)")

    def submit(self, inputs: dict[str, np.ndarray]) -> None:
        if not self.procs:
            raise RankError("the engine's ranks were stopped (shut down, or after a failure); load the engine again")
        for conn in self.conns:
            conn.send(inputs)

    def result(self) -> torch.Tensor:
        return torch.from_numpy(self._receive(self.output_rank, self.rank_timeout, "return a step"))

    def shutdown(self) -> None:
        self._stop()
        self.procs, self.conns = [], []


def _stop_ranks(procs, conns) -> None:
    """Stop every rank: ask, then kill what is still running after 5 s; no process is left behind."""
    for conn in conns:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    for conn in conns:
        conn.close()


class TorchrunExecutor(Executor):
    """Rank 0 of a torchrun job: runs the first stage's tp rank 0 here and sends every step to the
    other ranks (`worker.run_torchrun_rank`), on this machine or others. A rank that fails or is
    silent for `rank_timeout` seconds fails the collective waiting on it, and so the step."""

    def __init__(self, engine_dir: Path, config: EngineConfig, num_blocks: int, rank_timeout: float):
        from llmc.runtime.worker import RankWorker, join_torchrun

        self.messages = join_torchrun(config, rank_timeout)
        self.world = config.world_size
        self.output_rank = (config.mapping["pp"] - 1) * config.mapping["tp"]
        for rank in range(1, self.world):
            self.messages.send(num_blocks, rank)
        self.worker = RankWorker(engine_dir, config, 0, num_blocks)
        self._local: deque[np.ndarray] = deque()

    def submit(self, inputs: dict[str, np.ndarray]) -> None:
        try:
            for rank in range(1, self.world):
                self.messages.send(inputs, rank)
            logits = self.worker.step(inputs)
        except RuntimeError as e:
            raise RankError(f"a step failed on the ranks: {e}") from e
        if logits is not None:
            self._local.append(logits)

    def result(self) -> torch.Tensor:
        try:
            logits = self._local.popleft() if self.output_rank == 0 else self.messages.recv(self.output_rank)
        except RuntimeError as e:
            raise RankError(f"rank {self.output_rank} returned no step: {e}") from e
        return torch.from_numpy(logits)

    def shutdown(self) -> None:
        if not dist.is_initialized():
            return
        try:
            for rank in range(1, self.world):
                self.messages.send(None, rank)
            self.messages.flush()
        finally:
            dist.destroy_process_group()
