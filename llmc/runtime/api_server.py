"""`llmc serve`: an OpenAI-compatible HTTP server over one engine.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming for both), /v1/models, /health,
/metrics (Prometheus). Errors come back as OpenAI's error object with a 4xx status; a bad request
never disturbs the others, and a request that fails while being served fails alone (500, or an error
event in its stream). The event loop only moves bytes: tokenizing and chat templating run on threads,
a body over max_request_bytes is refused (413) as it arrives, and a client that goes away aborts its requests.

Failure is loud: if the engine fails, every request in flight ends with an error (a stream with an
error event) and `serve` stops the server and raises, so that `llmc serve` exits non-zero and a
supervisor restarts it. SIGTERM (or Ctrl-C) drains: new requests get 503, those in flight get up to
`shutdown_timeout` seconds to finish, then what is left ends with an error and the server exits.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from typing import AsyncIterator, Awaitable, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.runtime.async_llm import AsyncLLM, EngineDeadError, ShutdownError
from llmc.runtime.metrics import ServerMetrics
from llmc.runtime.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    error_response,
    sse,
    usage_dict,
    validation_error,
)
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import InvalidParam, SamplingParams

T = TypeVar("T")
# A prompt of 128k tokens is ~0.5 MB of text, ~1 MB as token ids in JSON: 16 MiB leaves room for any
# engine's prompt (or a list of them) while bounding what one request makes the server read and parse.
DEFAULT_MAX_REQUEST_BYTES = 16 << 20

log = logging.getLogger("llmc")


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 before anything parses it, by its
    Content-Length, or (chunked) as soon as the bytes received so far exceed it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> str:
        return f"request body is larger than this server's limit of {self.max_bytes} bytes (`llmc serve --max-request-bytes`)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, self.too_large())(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # the body is read before the endpoint runs: no response has begun
                raise StarletteHTTPException(413, self.too_large())
            return message

        await self.app(scope, counted, send)


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    app = FastAPI(title="llmc", version=__import__("llmc").__version__)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.state.draining = False  # set while the server shuts down: new requests get 503
    app.state.metrics = metrics = ServerMetrics(llm)
    engine = llm.engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(ShutdownError)
    async def _engine_unavailable(request: Request, e: EngineDeadError | ShutdownError):
        return error_response(503, str(e), "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        problems, param = validation_error(e.errors())
        return error_response(400, f"invalid request: {problems}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authentication_error")
        if app.state.draining and request.url.path.startswith("/v1"):
            return error_response(503, "the server is shutting down; send the request to another replica", "server_error")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.", "not_found_error", "model", "model_not_found")

    async def checked(req: SamplingRequest, params: SamplingParams) -> SamplingParams:
        """`params` checked against the engine; a grammar is compiled now, on a thread (it may take a while),
        and one that does not compile is a 400 naming the request's field that holds it."""
        try:
            if params.guided_decoding is None:
                engine.check_params(params)
            else:
                await asyncio.to_thread(engine.check_params, params)
        except InvalidParam as e:
            field = req.guided_field if e.param.startswith("guided_decoding") else e.param
            raise APIError(400, f"{field}: {e}" if field != e.param else str(e), param=field) from None
        return params

    async def start(prompts: list, params: SamplingParams) -> list[AsyncIterator[RequestOutput]]:
        """The requests' outputs; a bad prompt raises APIError now, before the response begins.
        Tokenizing runs on a thread: a long prompt must not stall the other requests' streams."""
        try:
            token_ids = await asyncio.to_thread(lambda: [engine.tokenize(p) for p in prompts])
            return [metrics.track(llm.generate(ids, params)) for ids in token_ids]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None

    @app.get("/health")
    async def health():
        if llm.error is not None:
            return error_response(503, f"engine stopped: {llm.error}", "server_error")
        if app.state.draining:
            return error_response(503, "the server is shutting down", "server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llmc", "max_model_len": llm.engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        params = await checked(req, req.sampling_params(req.max_tokens, req.logprobs))
        prompts = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        streams = await start(prompts, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i: int, out: RequestOutput, text: str) -> dict:
            c = {"index": i, "text": text, "finish_reason": out.finish_reason, "logprobs": None}
            if out.logprobs is not None:
                c["logprobs"] = completion_logprobs(llm.tokenizer, out)
            return c

        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            async def events():
                usage = [0, 0]
                async for i, out in merge(streams):
                    if out.error:
                        yield failed(out)
                        return
                    if out.delta_text or out.finished:
                        yield sse({**base, "choices": [choice(i, out, out.delta_text)]})
                    if out.finished:
                        usage[0] += len(out.prompt_token_ids)
                        usage[1] += len(out.token_ids)
                if (req.stream_options or {}).get("include_usage"):
                    yield sse({**base, "choices": [], "usage": usage_dict(*usage)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        finals = await unless_disconnected(request, gather(*(last(s) for s in streams)))
        return {
            **base,
            "choices": [choice(i, out, (prompts[i] if req.echo and isinstance(prompts[i], str) else "") + out.text) for i, out in enumerate(finals)],
            "usage": usage_dict(sum(len(o.prompt_token_ids) for o in finals), sum(len(o.token_ids) for o in finals)),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        names = {"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens", "logprobs": "top_logprobs"}
        params = await checked(req, req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None, names))
        tokenizer = llm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"`{model_name}` has no chat template in its tokenizer; use /v1/completions", param="messages")
        messages = [m.for_template() for m in req.messages]
        try:
            prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own error, e.g. a role it does not accept
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        [stream] = await start([prompt], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": model_name}
        if req.stream:
            async def events():
                first = True
                async for out in stream:
                    if out.error:
                        yield failed(out)
                        return
                    delta = {"role": "assistant", "content": out.delta_text} if first else {"content": out.delta_text}
                    if out.delta_text or first or out.finished:
                        chunk = {"index": 0, "delta": delta, "finish_reason": out.finish_reason, "logprobs": None}
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [chunk]})
                    first = False
                    if out.finished and (req.stream_options or {}).get("include_usage"):
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage_dict(len(out.prompt_token_ids), len(out.token_ids))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        [out] = await unless_disconnected(request, gather(last(stream)))
        message = {"role": "assistant", "content": out.text}
        logprobs = {"content": chat_logprobs(tokenizer, out, req.top_logprobs or 0)} if out.logprobs is not None else None
        return {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason, "logprobs": logprobs}],
            "usage": usage_dict(len(out.prompt_token_ids), len(out.token_ids)),
        }

    return app


def failed(out: RequestOutput) -> str:
    """The stream event of a request that failed while being served."""
    return sse(error_body(f"request failed: {out.error}", "server_error"))


async def last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    """A request's final output; one that failed while being served raises APIError 500 with its reason."""
    out = None
    async for out in outputs:
        pass
    if out.error:
        raise APIError(500, f"request failed: {out.error}", "server_error")
    return out


async def gather(*requests: Awaitable[T]) -> list[T]:
    """Await all at once (a prompt list runs batched); if one fails, the others are cancelled (aborted)."""
    tasks = [asyncio.ensure_future(r) for r in requests]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await a non-streaming response's work; if its client goes away first, cancel the work, which
    aborts its requests in the engine at once instead of computing tokens for nobody."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():  # nobody is left to read a response
        raise APIError(499, "client disconnected")
    return task.result()


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with their index."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        try:
            async for out in s:
                await q.put((i, out))
        except Exception as e:  # the request failed: the consumer raises it
            await q.put((i, e))
        else:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await q.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def ending_in_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's events, ended by an error event (and no [DONE]) if its request fails midway: its
    200 status is long sent, so the error goes in the stream, as OpenAI's error object."""
    try:
        async for event in events:
            yield event
    except Exception as e:
        if not isinstance(e, (EngineDeadError, ShutdownError)):
            log.exception("a streaming request failed")
        yield sse(error_body(str(e), "server_error"))


class Server(uvicorn.Server):
    """uvicorn serving `app`, stopped llmc's way. The first SIGTERM or Ctrl-C drains: new requests get
    503, those in flight get `shutdown_timeout` seconds, then what is left ends with an error; a second
    signal stops at once. If the engine fails, the server stops once the failed requests' errors are sent."""

    FLUSH_TIMEOUT = 5.0  # seconds for responses still being sent when uvicorn stops

    def __init__(self, llm: AsyncLLM, app: FastAPI, shutdown_timeout: float = 30.0, **uvicorn_kwargs):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=self.FLUSH_TIMEOUT, **uvicorn_kwargs))
        self.llm, self.app, self.shutdown_timeout = llm, app, shutdown_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            self.app.state.draining = True
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s on the event loop: whether to stop."""
        return self._done() or await super().on_tick(counter)

    def _done(self) -> bool:
        if self.llm.error is not None:
            self.app.state.draining = True
            return True  # every request in flight has its error; uvicorn sends them before it stops
        if self.drain_deadline is None or (self.llm.num_requests and time.monotonic() < self.drain_deadline):
            return False
        if self.llm.num_requests:
            log.warning("shutting down: %d requests did not finish within %g s; ending them", self.llm.num_requests, self.shutdown_timeout)
            self.llm.fail_requests(ShutdownError(f"the server shut down before the request finished (--shutdown-timeout {self.shutdown_timeout:g} s)"))
        return True

    def run(self, sockets=None) -> None:
        """Serve until stopped; raises EngineDeadError if the engine failed."""
        super().run(sockets)
        if self.llm.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.llm.error}")


def serve(engine_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          shutdown_timeout: float = 30.0, **engine_kwargs) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain, see `Server`); raises EngineDeadError if the engine fails."""
    from llmc.runtime.llm_engine import LLMEngine

    llm = AsyncLLM(LLMEngine(engine_dir, **engine_kwargs))
    name = served_model_name or str(engine_dir).rstrip("/").split("/")[-1]
    try:
        Server(llm, build_app(llm, name, api_key, max_request_bytes), shutdown_timeout, host=host, port=port, log_level="info").run()
    finally:
        llm.shutdown()
