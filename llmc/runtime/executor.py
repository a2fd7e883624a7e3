"""Executors run steps on an engine's ranks: in this process (one rank), or in one process per rank.

Both take a step's inputs with `submit` and hand back logits in submission order with `result`, so
the engine can keep several steps in flight (one per pipeline stage) and stages work at once.
"""

from __future__ import annotations

import os
import signal
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

from llmc.engine import EngineConfig
from llmc.open_runner import Runner, open_runner


class RankError(RuntimeError):
    """A rank died, hung, or failed; every rank has been stopped."""


# A rank process re-imports the script that started the engine (multiprocessing does, to find its
# functions). A script without the `if __name__ == "__main__":` guard would start an engine again in
# every rank; the rank exits with this code at once instead, and the driver names the guard.
UNGUARDED_MAIN_EXIT = 87
UNGUARDED_MAIN = ('your script starts a multi-rank engine at import time; put that code under `if __name__ == "__main__":` '
                  "(each rank process imports the script, as Python's multiprocessing does)")


def exit_if_importing_main() -> None:
    """Called as an engine starts: in a rank process that is importing the user's script, exit quietly."""
    if getattr(mp.current_process(), "_inheriting", False):
        os._exit(UNGUARDED_MAIN_EXIT)


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

    def check_health(self) -> None:
        """Raise RankError if the engine's ranks can no longer step (checked while idle)."""

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    """A single-rank engine, run in this process on `device`."""

    def __init__(self, engine_dir: Path, config: EngineConfig, num_blocks: int, device: torch.device):
        self.runner: Runner = open_runner(engine_dir, config, 0, num_blocks, device)
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
    """A tp x ep x pp engine on this machine: one process per rank, started here and stopped with the engine.

    Every rank reports each step it finishes (the output rank with the logits, the others with None),
    so when a step is late the driver can tell which rank holds it up. If a rank dies, or a step takes
    longer than `rank_timeout` seconds, `result` kills every rank and raises RankError naming the rank.
    """

    def __init__(self, engine_dir: Path, config: EngineConfig, num_blocks: int, rank_timeout: float, load_timeout: float = 600):
        from llmc.runtime.worker import run_local_rank

        self.rank_timeout = rank_timeout
        world = config.world_size
        self.stage = config.stage_ranks
        self.output_rank = (config.mapping["pp"] - 1) * self.stage  # the last stage's first rank
        # forkserver: ranks fork from a process that has imported torch once, not each its own.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["llmc.runtime.worker"])
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = max(1, (os.cpu_count() or 1) // world)
        # The ranks' own collectives wait longer than the driver does, so that the driver, which can
        # tell a stalled rank from the peers waiting on it, is the one that reports it.
        collective_timeout = 2 * rank_timeout
        self.procs, self.conns = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=run_local_rank,
                args=(rank, str(engine_dir), num_blocks, init_method, collective_timeout, threads, child),
                name=f"llmc-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        # Also when the engine is garbage-collected without a shutdown.
        self._stop = weakref.finalize(self, _stop_ranks, list(self.procs), list(self.conns))
        self.steps_done = [-1] * world  # per rank: the number of the last step it reported finished
        self.steps_returned = 0  # steps whose logits `result` has returned
        self._wait_all(lambda: all(n == 0 for n in self.steps_done), load_timeout,
                       lambda: f"{self._late(0)} did not load the engine within {load_timeout:g} s")

    def submit(self, inputs: dict[str, np.ndarray]) -> None:
        if not self.procs:
            raise RankError("the engine's ranks were stopped (shut down, or after a failure); load the engine again")
        for conn in self.conns:
            conn.send(inputs)

    def result(self) -> torch.Tensor:
        step = self.steps_returned + 1  # 0 is the ranks' "ready"
        logits = self._wait_all(lambda: self.steps_done[self.output_rank] >= step, self.rank_timeout,
                                lambda: f"{self._late(step)} did not finish a step within {self.rank_timeout:g} s")
        self.steps_returned += 1
        return torch.from_numpy(logits)

    def check_health(self) -> None:
        """Raise RankError if a rank has exited (between steps, when nothing else would notice)."""
        if any(not p.is_alive() for p in self.procs):
            self._fail(self._dead())

    def _wait_all(self, done, timeout: float, late):
        """Read the ranks' reports until `done()`; returns the output rank's last one. A rank that exits,
        or `timeout` seconds without `done()`, kills every rank and raises RankError (`late()` says why)."""
        deadline = time.monotonic() + timeout
        message = None
        while not done():
            ready = connection.wait(self.conns + [p.sentinel for p in self.procs], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._fail(late())
            for rank, conn in enumerate(self.conns):
                if conn in ready:
                    try:
                        reply = conn.recv()
                    except (EOFError, OSError):  # it died (a reset if it left our last step unread): reported below
                        continue
                    self.steps_done[rank] += 1
                    if rank == self.output_rank and self.steps_done[rank] == self.steps_returned + 1:
                        message = reply
            if any(not p.is_alive() for p in self.procs):
                self._fail(self._dead())
        return message

    def _late(self, step: int) -> str:
        """The ranks that have not finished `step`: a stopped one if any, else those of the first stage
        that is behind (later stages and tensor-parallel peers only wait on them)."""
        late = [r for r, n in enumerate(self.steps_done) if n < step]
        stopped = [r for r in late if _is_stopped(self.procs[r].pid)]
        if stopped:
            return ", ".join(f"rank {r} (pid {self.procs[r].pid}, stopped: SIGSTOP?)" for r in stopped)
        first_stage = min(late) // self.stage
        return ", ".join(f"rank {r} (pid {self.procs[r].pid})" for r in late if r // self.stage == first_stage)

    def _dead(self) -> str:
        dead = [(r, p) for r, p in enumerate(self.procs) if not p.is_alive()]
        if any(p.exitcode == UNGUARDED_MAIN_EXIT for _, p in dead):
            return UNGUARDED_MAIN
        dead.sort(key=lambda rp: rp[1].exitcode >= 0)  # the killed first: the others likely failed on them
        return "; ".join(f"rank {r} (pid {p.pid}) {_exit_description(p.exitcode)}" for r, p in dead)

    def _fail(self, why: str):
        for proc in self.procs:  # the ranks of a failed step are stuck or dying: no grace
            proc.kill()
        self.shutdown()
        raise RankError(why if why == UNGUARDED_MAIN else f"{why}; all ranks were stopped (their errors are above, on stderr)")

    def shutdown(self) -> None:
        self._stop()
        self.procs, self.conns = [], []


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exited with code {code}"


def _is_stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP, a debugger); False where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


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
        self.output_rank = (config.mapping["pp"] - 1) * config.stage_ranks
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
