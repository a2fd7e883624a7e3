"""`llmc serve`: an OpenAI-compatible HTTP server over one engine.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming for both), /v1/models, and vLLM's
/tokenize, /detokenize, /version; /health, /metrics (Prometheus). Errors come back as OpenAI's error object with a 4xx status; a bad request
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
import dataclasses
import logging
import secrets
import socket
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.runtime.async_llm import AsyncLLM, EngineDeadError, ShutdownError
from llmc.runtime.metrics import ServerMetrics
from llmc.runtime.stats_log import StatsLog, banner
from llmc.runtime.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    error_response,
    sse,
    usage_dict,
    validation_error,
)
from llmc.runtime.outputs import CompletionOutput, RequestOutput
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

    async def start(prompts: list, params: SamplingParams, max_tokens_param: str = "max_tokens",
                    fill_context: bool = False) -> list[AsyncIterator[RequestOutput]]:
        """The requests' outputs; a bad prompt, or one that leaves no room for max_tokens, raises APIError now,
        before the response begins. With fill_context, max_tokens is the rest of the context (chat's default).
        Tokenizing runs on a thread: a long prompt must not stall the other requests' streams."""
        try:
            token_ids = await asyncio.to_thread(lambda: [engine.tokenize(p) for p in prompts])
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        limit, each = engine.max_seq_len, []
        for ids in token_ids:
            wanted = 0 if fill_context else params.max_tokens
            if len(ids) + max(wanted, params.min_tokens) > limit:
                raise APIError(400, f"this model's context holds {limit} tokens, but the request asks for {len(ids) + max(wanted, params.min_tokens)} "
                               f"({len(ids)} in the prompt, {max(wanted, params.min_tokens)} to generate); shorten the prompt or lower {max_tokens_param}",
                               param=max_tokens_param)
            each.append(dataclasses.replace(params, max_tokens=limit - len(ids)) if fill_context else params)
        return [metrics.track(llm.generate(ids, p)) for ids, p in zip(token_ids, each)]

    async def chat_prompt(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        tokenizer = llm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"`{model_name}` has no chat template in its tokenizer; use /v1/completions", param="messages")
        try:
            return await asyncio.to_thread(tokenizer.apply_chat_template, [m.for_template() for m in messages], tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template's own error, e.g. a role it does not accept
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None

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

    @app.get("/version")
    async def version():
        return {"version": __import__("llmc").__version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llmc", "max_model_len": llm.engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        text = req.prompt if req.prompt is not None else await chat_prompt(req.messages, req.add_generation_prompt)
        add_special = req.add_special_tokens if req.add_special_tokens is not None else req.prompt is not None
        most = engine.max_seq_len * engine.max_token_chars  # as engine.tokenize: a text this long is no prompt
        if len(text) > most:
            raise APIError(400, f"prompt has {len(text)} characters; this server tokenizes at most {most}", param="prompt")
        ids = await asyncio.to_thread(lambda: llm.tokenizer(text, add_special_tokens=add_special)["input_ids"])
        strs = llm.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = engine.config.vocab_size
        if not all(0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be token ids in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(llm.tokenizer.decode, req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        params = await checked(req, req.sampling_params(req.max_tokens, req.logprobs, prompt_logprobs=req.logprobs if req.echo else None))
        prompts = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        streams = await start(prompts, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tokenizer, n = llm.tokenizer, params.n

        def echoed(out: RequestOutput) -> str:
            return out.prompt if out.prompt is not None else tokenizer.decode(out.prompt_token_ids)

        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if req.stream:
            async def events():
                usage, sent, ended = [0, 0], {}, set()  # sent: per choice, the tokens its chunks carried so far
                async for i, out in merge(streams):
                    if out.error:
                        yield failed(out)
                        return
                    for j, c in enumerate(out.outputs):
                        index = i * n + j
                        first = index not in sent
                        done = sent.get(index, 0)
                        text = (echoed(out) if req.echo and first else "") + c.delta_text
                        if index in ended or not (first or text or len(c.token_ids) > done or c.finished):
                            continue  # (a sample that finished stays in its request's outputs while others run)
                        if c.finished:
                            ended.add(index)
                        chunk = {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": None}
                        if c.logprobs is not None:
                            part = CompletionOutput(c.index, "", c.token_ids[done:], None, c.logprobs[done:], None)
                            chunk["logprobs"] = completion_logprobs(tokenizer, out, part, echo=req.echo and first)
                        sent[index] = len(c.token_ids)
                        yield sse({**base, "choices": [chunk]})
                    if out.finished:
                        usage[0] += len(out.prompt_token_ids)
                        usage[1] += sum(len(c.token_ids) for c in out.outputs)
                if (req.stream_options or {}).get("include_usage"):
                    yield sse({**base, "choices": [], "usage": usage_dict(*usage)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        finals = await unless_disconnected(request, gather(*(last(s) for s in streams)))
        choices = []
        for i, out in enumerate(finals):
            for j, c in enumerate(out.outputs):
                choice = {"index": i * n + j, "text": (echoed(out) if req.echo else "") + c.text, "finish_reason": c.finish_reason, "logprobs": None}
                if c.logprobs is not None:
                    choice["logprobs"] = completion_logprobs(tokenizer, out, c, echo=req.echo)
                choices.append(choice)
        return {
            **base,
            "choices": choices,
            "usage": usage_dict(sum(len(o.prompt_token_ids) for o in finals), sum(len(c.token_ids) for o in finals for c in o.outputs)),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if max_tokens == 0:  # only completions' echo scores a prompt without generating
            raise APIError(400, f"{max_name} must be an integer >= 1, got 0", param=max_name)
        names = {"max_tokens": max_name, "logprobs": "top_logprobs"}
        params = await checked(req, req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None, names))
        prompt = await chat_prompt(req.messages)
        [stream] = await start([prompt], params, max_name, fill_context=max_tokens is None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": model_name}
        tokenizer = llm.tokenizer
        if req.stream:
            async def events():
                started, ended, sent = set(), set(), {}  # sent: tokens of each sample whose logprobs went out
                async for out in stream:
                    if out.error:
                        yield failed(out)
                        return
                    for j, c in enumerate(out.outputs):
                        first = j not in started
                        delta = {"role": "assistant", "content": c.delta_text} if first else {"content": c.delta_text}
                        if j not in ended and (c.delta_text or first or c.finished):
                            if c.finished:
                                ended.add(j)
                            chunk = {"index": j, "delta": delta, "finish_reason": c.finish_reason, "logprobs": None}
                            if c.logprobs is not None:
                                done = sent.get(j, 0)
                                part = CompletionOutput(c.index, "", c.token_ids[done:], None, c.logprobs[done:], None)
                                chunk["logprobs"] = {"content": chat_logprobs(tokenizer, part, req.top_logprobs or 0)}
                                sent[j] = len(c.token_ids)
                            yield sse({**base, "object": "chat.completion.chunk", "choices": [chunk]})
                            started.add(j)
                    if out.finished and (req.stream_options or {}).get("include_usage"):
                        usage = usage_dict(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return StreamingResponse(ending_in_error_event(events()), media_type="text/event-stream")
        [out] = await unless_disconnected(request, gather(last(stream)))
        choices = [
            {
                "index": j,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": {"content": chat_logprobs(tokenizer, c, req.top_logprobs or 0)} if c.logprobs is not None else None,
            }
            for j, c in enumerate(out.outputs)
        ]
        return {
            **base,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage_dict(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs)),
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

    def __init__(self, llm: AsyncLLM, app: FastAPI, shutdown_timeout: float = 30.0, stats: StatsLog | None = None, **uvicorn_kwargs):
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=self.FLUSH_TIMEOUT, **uvicorn_kwargs))
        self.llm, self.app, self.shutdown_timeout, self.stats = llm, app, shutdown_timeout, stats
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            self.app.state.draining = True
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Every 0.1 s on the event loop: whether to stop (and, when due, the stats line)."""
        if self.stats is not None:
            self.stats.tick()
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


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, made before the engine loads so that a busy port fails at once (ValueError)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; another server may hold the port (choose another --port)") from None
    return sock


def read_chat_template(template: str) -> str:
    """`--chat-template`: a file's text, or the template itself; a Jinja syntax error is a ValueError now."""
    import jinja2

    path = Path(template)
    if len(template) < 4096 and path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {path}: cannot read it as UTF-8 text ({e})") from None
    elif "{" not in template:
        raise ValueError(f"--chat-template {template}: no such file, and not a Jinja template")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template is not a valid Jinja template: {e.message} (line {e.lineno})") from None
    return template


def serve(engine_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
          shutdown_timeout: float = 30.0, sock: socket.socket | None = None, chat_template: str | None = None,
          log_stats_interval: float = 5.0, **engine_kwargs) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain, see `Server`); raises EngineDeadError if the engine fails.

    `sock`, a bound socket (`listen`), is served instead of host:port. `chat_template` replaces the
    tokenizer's. While requests run, a stats line is logged every `log_stats_interval` seconds (0: never).
    """
    from llmc.runtime.llm_engine import LLMEngine

    setup_logging()
    sock = sock or listen(host, port)
    host, port = sock.getsockname()[:2]
    llm = AsyncLLM(LLMEngine(engine_dir, **engine_kwargs))
    if chat_template is not None:
        llm.tokenizer.chat_template = chat_template
    name = served_model_name or str(engine_dir).rstrip("/").split("/")[-1]
    try:
        for line in banner(llm.engine, name, engine_dir):
            log.info(line)
        log.info("listening on http://%s:%d (OpenAI API under /v1)", f"[{host}]" if ":" in host else host, port)
        app = build_app(llm, name, api_key, max_request_bytes)
        stats = StatsLog(app.state.metrics, log_stats_interval) if log_stats_interval > 0 else None
        server = Server(llm, app, shutdown_timeout, stats=stats, log_level="info")
        server.run(sockets=[sock])
    finally:
        llm.shutdown()
        sock.close()


def setup_logging() -> None:
    """llmc's log lines (banner, stats, warnings) on stderr with a time, as uvicorn's; once."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s llmc: %(message)s", "%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
