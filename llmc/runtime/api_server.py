"""`llmc serve`: an OpenAI-compatible HTTP server over one engine.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming for both), /v1/models, /health,
/metrics (Prometheus). Errors come back as OpenAI's error object with a 4xx status; a bad request
never disturbs the others.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints; names as in OpenAI's API, plus vLLM's extensions."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        try:
            return SamplingParams(
                max_tokens=16 if max_tokens is None else max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                stop=self.stop or [],
                stop_token_ids=self.stop_token_ids or [],
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ServerMetrics:
    def __init__(self, llm: AsyncLLM):
        self.llm = llm
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llmc_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("llmc_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("llmc_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("llmc_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up", registry=r)
        self.requests = Counter("llmc_request_success", "Finished requests", ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("llmc_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmc_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.tpot = Histogram("llmc_time_per_output_token_seconds", "Time per output token after the first", buckets=buckets, registry=r)

    def render(self) -> bytes:
        scheduler = self.llm.engine.scheduler
        blocks = scheduler.block_manager
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(blocks.usage)
        queries = getattr(blocks, "prefix_cache_queries", 0)
        self.prefix_hit_rate.set(getattr(blocks, "prefix_cache_hits", 0) / queries if queries else 0.0)
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass outputs through, timing first token and the tokens after it."""
        start = last = time.perf_counter()
        count = 0
        async for out in outputs:
            now = time.perf_counter()
            new = len(out.token_ids) - count
            if count == 0:
                self.ttft.observe(now - start)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
            elif new:
                self.tpot.observe((now - last) / new)
            count, last = len(out.token_ids), now
            self.generation_tokens.inc(new)
            if out.finished:
                self.requests.labels(out.finish_reason).inc()
            yield out


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llmc", version=__import__("llmc").__version__)
    metrics = ServerMetrics(llm)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

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

            return StreamingResponse(events(), media_type="text/event-stream")
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

            return StreamingResponse(events(), media_type="text/event-stream")
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


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage_dict(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def last(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    out = None
    async for out in outputs:
        pass
    return out


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with their index."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, s):
        async for out in s:
            await q.put((i, out))
        await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await q.get()
            if out is None:
                remaining -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()


def completion_logprobs(tokenizer, out: RequestOutput) -> dict:
    tokens = [tokenizer.decode([t]) for t in out.token_ids]
    return {
        "tokens": tokens,
        "token_logprobs": [lp[t] for t, lp in zip(out.token_ids, out.logprobs)],
        "top_logprobs": [{tokenizer.decode([k]): v for k, v in lp.items()} for lp in out.logprobs],
        "text_offset": [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))],
    }


def chat_logprobs(tokenizer, out: RequestOutput, top_n: int) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [
        {**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]]}
        for t, lp in zip(out.token_ids, out.logprobs)
    ]


def serve(engine_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, **engine_kwargs) -> None:
    import uvicorn

    from llmc.runtime.llm_engine import LLMEngine

    llm = AsyncLLM(LLMEngine(engine_dir, **engine_kwargs))
    name = served_model_name or str(engine_dir).rstrip("/").split("/")[-1]
    try:
        uvicorn.run(build_app(llm, name, api_key), host=host, port=port, log_level="info")
    finally:
        llm.shutdown()

