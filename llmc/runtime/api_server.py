"""`llmc serve`: an OpenAI-compatible HTTP server over one engine.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming for both), /v1/models, /health,
/metrics (Prometheus). Errors come back as OpenAI's error object with a 4xx status; a bad request
never disturbs the others.

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
from typing import AsyncIterator

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
    chat_logprobs,
    completion_logprobs,
    error_response,
    sse,
    usage_dict,
)
from llmc.runtime.outputs import RequestOutput

log = logging.getLogger("llmc")


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llmc", version=__import__("llmc").__version__)
    app.state.draining = False  # set while the server shuts down: new requests get 503
    app.state.metrics = metrics = ServerMetrics(llm)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(ShutdownError)
    async def _engine_unavailable(request: Request, e: EngineDeadError | ShutdownError):
        return error_response(503, str(e), "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'][1:]) or 'body'}: {err['msg']}" for err in e.errors())
        return error_response(400, f"invalid request: {problems}")

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

    def start(prompt, params) -> AsyncIterator[RequestOutput]:
        """A request's outputs; a bad prompt raises APIError now, before the response begins."""
        try:
            return metrics.track(llm.generate(prompt, params))
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
    async def completions(req: CompletionRequest):
        check_model(req.model)
        params = req.sampling_params(req.max_tokens, req.logprobs)
        prompts = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        streams = [start(p, params) for p in prompts]
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
                    if out.delta_text or out.finished:
                        yield sse({**base, "choices": [choice(i, out, out.delta_text)]})
                    if out.finished:
                        usage[0] += len(out.prompt_token_ids)
                        usage[1] += len(out.token_ids)
                if (req.stream_options or {}).get("include_usage"):
                    yield sse({**base, "choices": [], "usage": usage_dict(*usage)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        finals = [await last(s) for s in streams]
        return {
            **base,
            "choices": [choice(i, out, (prompts[i] if req.echo and isinstance(prompts[i], str) else "") + out.text) for i, out in enumerate(finals)],
            "usage": usage_dict(sum(len(o.prompt_token_ids) for o in finals), sum(len(o.token_ids) for o in finals)),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        check_model(req.model)
        params = req.sampling_params(req.max_completion_tokens or req.max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        tokenizer = llm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"`{model_name}` has no chat template in its tokenizer; use /v1/completions", param="messages")
        try:
            prompt = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in req.messages], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own error, e.g. a role it does not accept
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        stream = start(prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": model_name}
        if req.stream:
            async def events():
                first = True
                async for out in stream:
                    delta = {"role": "assistant", "content": out.delta_text} if first else {"content": out.delta_text}
                    if out.delta_text or first or out.finished:
                        chunk = {"index": 0, "delta": delta, "finish_reason": out.finish_reason, "logprobs": None}
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [chunk]})
                    first = False
                    if out.finished and (req.stream_options or {}).get("include_usage"):
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage_dict(len(out.prompt_token_ids), len(out.token_ids))})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        out = await last(stream)
        message = {"role": "assistant", "content": out.text}
        logprobs = {"content": chat_logprobs(tokenizer, out, req.top_logprobs or 0)} if out.logprobs is not None else None
        return {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason, "logprobs": logprobs}],
            "usage": usage_dict(len(out.prompt_token_ids), len(out.token_ids)),
        }

    return app


async def last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in outputs:
        pass
    return out


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
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})


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
          served_model_name: str | None = None, shutdown_timeout: float = 30.0, **engine_kwargs) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain, see `Server`); raises EngineDeadError if the engine fails."""
    from llmc.runtime.llm_engine import LLMEngine

    llm = AsyncLLM(LLMEngine(engine_dir, **engine_kwargs))
    name = served_model_name or str(engine_dir).rstrip("/").split("/")[-1]
    try:
        Server(llm, build_app(llm, name, api_key), shutdown_timeout, host=host, port=port, log_level="info").run()
    finally:
        llm.shutdown()
