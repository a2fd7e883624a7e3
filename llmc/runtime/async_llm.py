"""`AsyncLLM`: one engine shared by many asyncio clients (the server's engine).

The engine's step loop runs on its own thread, so model compute never blocks the event loop.
Clients hand requests over through a thread-safe queue and receive their outputs on an asyncio
queue each; a client that goes away aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator

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
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
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

    async def _outputs(self, request_id, token_ids, params, prompt) -> AsyncIterator[RequestOutput]:
        sink: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", request_id, token_ids, params, prompt, (asyncio.get_running_loop(), sink)))
        self._wake.set()
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
                self._inbox.put(("abort", request_id))
                self._wake.set()

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
                for out in self.engine.step():
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
        if sink is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, item)
