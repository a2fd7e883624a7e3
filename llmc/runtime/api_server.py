"""`llmc serve`: an OpenAI-compatible HTTP server over one engine.

Endpoints: /v1/completions, /v1/chat/completions (SSE streaming for both), /v1/models, /health,
/metrics (Prometheus). Errors come back as OpenAI's error object with a 4xx status; a bad request
never disturbs the others.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmc.runtime.async_llm import AsyncLLM, EngineDeadError
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


def build_app(llm: AsyncLLM, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llmc", version=__import__("llmc").__version__)
    metrics = ServerMetrics(llm)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, e: EngineDeadError):
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

