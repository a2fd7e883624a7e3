"""`AsyncLLM`: one engine shared by many asyncio clients (the server's engine).

The engine's step loop runs on its own thread, so model compute never blocks the event loop.
Clients hand requests over through a thread-safe queue and receive their outputs on an asyncio
queue each; a client that goes away aborts its request, which frees its KV blocks. Callers that are
not asyncio (Triton's Python backend) use `add_request` with a callback and `abort` directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator, Callable

from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams

log = logging.getLogger("llmc")


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()  # ("add", id, ids, params, prompt, sink) | ("abort", id)
        self._sinks: dict[str, Callable] = {}
        self.num_steps = 0  # in-flight batching at a glance: steps taken, and requests they advanced in all
        self.num_step_requests = 0
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llmc-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as tokens arrive; the last one is finished.

        A bad prompt raises ValueError here, before anything is queued; the request starts when
        the iterator is first awaited, and is aborted if the iterator is closed early.
        """
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        token_ids = self.engine.tokenize(prompt)
        text = prompt if isinstance(prompt, str) else None
        return self._outputs(request_id or uuid.uuid4().hex, token_ids, params, text)

    def add_request(
        self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
        on_output: Callable[[RequestOutput | BaseException], None],
    ) -> None:
        """Queue a request (token ids from `engine.tokenize`), from any thread.

        `on_output` is called on the engine's thread with each output (the last one finished), or once
        with an exception that ends the request: ValueError if the engine refused it, else the engine's error.
        """
        self._inbox.put(("add", request_id, token_ids, params, prompt, on_output))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request, from any thread; its callback is not called again."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def _outputs(self, request_id, token_ids, params, prompt) -> AsyncIterator[RequestOutput]:
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.add_request(request_id, token_ids, params, prompt, lambda item: loop.call_soon_threadsafe(sink.put_nowait, item))
        finished = False
        try:
            while not finished:
                out = await sink.get()
                if isinstance(out, ValueError):  # refused by the engine, e.g. a duplicate request id
                    raise out
                if isinstance(out, BaseException):
                    raise EngineDeadError(f"the engine stopped after an error: {out}") from out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _loop(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.num_steps += 1
                self.num_step_requests += len(outputs)
                for out in outputs:
                    self._deliver(out.request_id, out, final=out.finished)
        except BaseException as e:  # the engine is unusable: tell every waiting client, then stop
            log.exception("engine step failed")
            self.error = e
            for request_id in list(self._sinks):
                self._deliver(request_id, e, final=True)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, token_ids, params, prompt, sink = item
                self._sinks[request_id] = sink
                try:
                    self.engine.add_request(token_ids, params, request_id, prompt)
                except ValueError as e:
                    self._deliver(request_id, e, final=True)
            else:
                self._sinks.pop(item[1], None)
                self.engine.abort_request(item[1])

    def _deliver(self, request_id: str, item, final: bool) -> None:
        sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is None:
            return
        try:
            sink(item)
        except Exception:  # one client's failing callback must not stop the engine for the others
            log.exception("delivering an output of request %s failed; aborting it", request_id)
            if not final:
                self._sinks.pop(request_id, None)
                self.engine.abort_request(request_id)
