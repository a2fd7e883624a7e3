"""`AsyncLLM`: one engine shared by many asyncio clients (the server's engine).

The engine's step loop runs on its own thread, so model compute never blocks the event loop.
Clients hand requests over through a thread-safe queue and receive their outputs on an asyncio
queue each; a client that goes away aborts its request, which frees its KV blocks. Callers that are
not asyncio (Triton's Python backend) use `add_request` with a callback and `abort` directly.

If the engine fails (a step raises; a rank dies, also between requests, or hangs), every request in
flight ends with EngineDeadError, new ones are refused with it, and `error` holds the cause.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import uuid
from typing import AsyncIterator, Callable

from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams

log = logging.getLogger("llmc")
HEALTH_CHECK_INTERVAL = 1.0  # seconds


class EngineDeadError(RuntimeError):
    """The engine failed (a step raised, a rank died or hung); it serves no more requests."""


class ShutdownError(RuntimeError):
    """The server is shutting down and ended this request."""


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()  # ("add", id, ids, params, prompt) | ("abort", id)
        # Requests in flight, by id: their callbacks. A request's callback is registered when it is queued,
        # so that a failure or a shutdown reaches every request, also those the loop has not taken yet.
        self._sinks: dict[str, Callable] = {}
        self._lock = threading.Lock()  # guards _sinks and _refusal
        self._refusal: BaseException | None = None  # what new requests get once the engine died or is shut down
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

    @property
    def num_requests(self) -> int:
        """Requests in flight: queued or running (their last output or error not yet handed over)."""
        return len(self._sinks)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as tokens arrive; the last one is finished.

        A bad prompt raises ValueError here, before anything is queued; the request starts when
        the iterator is first awaited, and is aborted if the iterator is closed early. If the engine
        fails meanwhile the iterator raises EngineDeadError (ShutdownError if the server stops it).
        """
        if self._refusal is not None:
            raise copy.copy(self._refusal)
        token_ids = self.engine.tokenize(prompt)
        text = prompt if isinstance(prompt, str) else None
        return self._outputs(request_id or uuid.uuid4().hex, token_ids, params, text)

    def add_request(
        self, request_id: str, token_ids: list[int], params: SamplingParams, prompt: str | None,
        on_output: Callable[[RequestOutput | BaseException], None],
    ) -> None:
        """Queue a request (token ids from `engine.tokenize`), from any thread.

        `on_output` is called with each output (the last one finished), or once with an exception that
        ends the request: ValueError if the engine refused it, EngineDeadError if the engine failed,
        ShutdownError if `fail_requests` ended it. It runs on the engine's thread, or on the caller's.
        """
        with self._lock:
            refusal = self._refusal
            if refusal is None and request_id in self._sinks:
                refusal = ValueError(f"request id {request_id!r} is already in flight")
            if refusal is None:
                self._sinks[request_id] = on_output
                self._inbox.put(("add", request_id, token_ids, params, prompt))
        if refusal is not None:
            on_output(copy.copy(refusal))
            return
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request, from any thread; its callback is not called again."""
        with self._lock:
            self._sinks.pop(request_id, None)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def fail_requests(self, error: BaseException) -> None:
        """End every request in flight with `error`, and refuse new ones with it (a server's last act)."""
        with self._lock:
            self._refusal = self._refusal or error
            sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            self._inbox.put(("abort", request_id))
            self._call(request_id, sink, copy.copy(error))  # an exception each: each is raised in its own task
        self._wake.set()

    async def _outputs(self, request_id, token_ids, params, prompt) -> AsyncIterator[RequestOutput]:
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.add_request(request_id, token_ids, params, prompt, lambda item: loop.call_soon_threadsafe(sink.put_nowait, item))
        finished = False
        try:
            while not finished:
                out = await sink.get()
                if isinstance(out, BaseException):
                    finished = True  # the request is over: nothing to abort
                    raise out
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
                    # Idle: look at the ranks now and then, so that one dying between requests is noticed.
                    if not self._wake.wait(HEALTH_CHECK_INTERVAL):
                        self.engine.executor.check_health()
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
            with self._lock:
                self._refusal = EngineDeadError(f"the engine stopped after an error: {e}")
                sinks, self._sinks = self._sinks, {}
            for request_id, sink in sinks.items():
                self._call(request_id, sink, copy.copy(self._refusal))

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, request_id, token_ids, params, prompt = item
                if request_id not in self._sinks:  # aborted before the loop took it
                    continue
                try:
                    self.engine.add_request(token_ids, params, request_id, prompt)
                except ValueError as e:
                    self._deliver(request_id, e, final=True)
            else:
                self.engine.abort_request(item[1])

    def _deliver(self, request_id: str, item, final: bool) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is not None and not self._call(request_id, sink, item) and not final:
            self.abort(request_id)

    @staticmethod
    def _call(request_id: str, sink: Callable, item) -> bool:
        try:
            sink(item)
            return True
        except Exception:  # one client's failing callback must not stop the engine for the others
            log.exception("delivering an output of request %s failed; aborting it", request_id)
            return False
