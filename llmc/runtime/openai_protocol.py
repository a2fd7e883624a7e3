"""The OpenAI API's shapes: request models (with vLLM's sampling extensions), errors, and response pieces."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llmc.runtime.openai_guided import GuidedRequestFields
from llmc.runtime.outputs import CompletionOutput, RequestOutput
from llmc.runtime.sampling_params import InvalidParam, SamplingParams


def _valid_unicode(text: str) -> str:
    """JSON's "\\ud800" escapes decode to lone surrogates, which no tokenizer (or UTF-8 response) can take."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"{e.reason} at character {e.start} ({text[e.start:e.end]!r}): not valid Unicode; send UTF-8 text") from None
    return text


# Request fields are checked strictly (no "1" for 1, no true for 1) and numbers must be finite: Python's
# JSON parser accepts NaN and Infinity. Ranges are SamplingParams' to check (one place, for the library too).
Text = Annotated[str, AfterValidator(_valid_unicode)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


class SamplingRequest(GuidedRequestFields):
    """Fields shared by both endpoints; names as in OpenAI's API, plus vLLM's extensions (structured output's in
    GuidedRequestFields). A field llmc does not implement is refused (400 naming it), never silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = None
    max_tokens: int | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: int = 0
    min_p: Number = 0.0
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    seed: int | None = None
    stop: Text | list[Text] | None = None
    include_stop_str_in_output: bool = False
    stop_token_ids: Annotated[list[int], Field(max_length=1024)] | None = None
    min_tokens: int = 0
    logit_bias: dict[str, Number] | None = None  # JSON keys are strings: token ids in decimal
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: Text | None = None  # OpenAI's end-user id, for the caller's abuse monitoring: nothing to do with it here

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, names: dict[str, str] | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """This request's SamplingParams; an invalid value raises APIError 400 naming the request's field
        (`names` maps SamplingParams' names to this endpoint's where they differ)."""
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of must equal n when streaming (the best ones are known only at the end)", param="best_of")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise APIError(400, f"logit_bias keys must be token ids (decimal integers), got {key[:40]!r}", param="logit_bias")
            bias[int(key)] = value
        try:
            guided_decoding = self.guided_decoding()
            return SamplingParams(
                max_tokens=16 if max_tokens is None else max_tokens,
                n=self.n,
                best_of=self.best_of,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                stop=self.stop or [],
                include_stop_str_in_output=self.include_stop_str_in_output,
                stop_token_ids=self.stop_token_ids or [],
                min_tokens=self.min_tokens,
                logit_bias=bias,
                ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                guided_decoding=guided_decoding,
            )
        except InvalidParam as e:
            raise APIError(400, str(e), param=(names or {}).get(e.param, e.param)) from None


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False  # the prompt before the completion; with logprobs, the prompt tokens' logprobs too


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages (templated as /v1/chat/completions does)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = None
    prompt: Text | None = None
    messages: list["ChatMessage"] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template has them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: Text | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 20)]


def _text_part(kind: str) -> str:
    if kind != "text":
        raise ValueError(f"content parts of type {kind[:40]!r} are not supported; send text parts ({{'type': 'text', 'text': ...}})")
    return kind


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Annotated[str, AfterValidator(_text_part)]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Text
    content: Text | list[TextPart] | None = None  # OpenAI's content parts: only text ones here, concatenated

    def for_template(self) -> dict:
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


TokenizeRequest.model_rebuild()


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def validation_error(errors: list[dict]) -> tuple[str, str | None]:
    """FastAPI's errors of a request body -> (a message naming each bad field, the first bad field).

    Locations lose pydantic's union-branch labels ("str", "list[int]", "function-after[...]"); where one
    branch of a union got further than a type mismatch, the other branches' mismatches are left out. So
    `{"content": [{"type": "image_url"}]}` reads `messages.0.content.0.type: ... not supported ...`."""
    def path(err) -> str:
        keep = [str(p) for p in err["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
        return ".".join(keep) or "body"

    for e in errors:
        if e["type"] == "extra_forbidden":
            e["msg"] = "not supported by this server (llmc); remove it"
    deeper = [path(e) for e in errors if not e["type"].endswith("_type")]
    kept = [e for e in errors if not (e["type"].endswith("_type") and any(d.startswith(path(e)) for d in deeper))]
    message = "; ".join(dict.fromkeys(f"{path(e)}: {e['msg'].removeprefix('Value error, ')}" for e in kept))
    return message, next((str(e["loc"][1]) for e in kept if len(e["loc"]) > 1), None)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage_dict(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(tokenizer, out: RequestOutput, completion: CompletionOutput, echo: bool) -> dict:
    """The completions API's logprobs of a choice: with echo, the prompt's tokens first (None for the first
    one, which nothing predicts), as lm-evaluation-harness's loglikelihood reads them."""
    token_ids, entries = list(completion.token_ids), list(completion.logprobs or [])
    if echo:
        token_ids = out.prompt_token_ids + token_ids
        entries = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
    tokens = [tokenizer.decode([t]) for t in token_ids]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp[t] if lp is not None else None for t, lp in zip(token_ids, entries)],
        "top_logprobs": [{tokenizer.decode([k]): v for k, v in lp.items()} if lp is not None else None for lp in entries],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, completion: CompletionOutput, top_n: int) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [
        {**entry(t, lp[t]), "top_logprobs": [entry(k, v) for k, v in sorted(lp.items(), key=lambda kv: -kv[1])[:top_n]]}
        for t, lp in zip(completion.token_ids, completion.logprobs)
    ]
