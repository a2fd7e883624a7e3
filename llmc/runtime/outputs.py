"""What a request yields: `RequestOutput`, built token by token by its `RequestState`."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.sequence import Sequence


@dataclass
class RequestOutput:
    """A request's output so far (all of it once `finished`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort", "error"; None while running
    delta_text: str = ""  # text added since the previous output of this request (for streaming)
    logprobs: list[dict[int, float]] | None = None  # per token: {chosen and top-n token id: logprob}
    error: str | None = None  # why the request failed (finish_reason "error"); the engine went on with the others

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestState:
    """The output side of one request: detokenizer, logprobs, and its RequestOutputs."""

    def __init__(self, seq: Sequence, tokenizer, prompt: str | None = None):
        self.seq = seq
        self.prompt = prompt
        p = seq.params
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, seq.token_ids, p.skip_special_tokens, p.stop, p.include_stop_str_in_output
        )
        self.logprobs: list[dict[int, float]] | None = [] if p.logprobs is not None else None

    def append(self, token: int, logprobs: dict[int, float] | None) -> str:
        """Record a new token; returns the text it finalized."""
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        return self.detokenizer.add(token)

    def output(self, delta_text: str) -> RequestOutput:
        seq = self.seq
        if seq.finish_reason is not None:
            delta_text += self.detokenizer.flush()
        return RequestOutput(
            request_id=seq.request_id,
            prompt=self.prompt,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=self.detokenizer.text,
            finish_reason=seq.finish_reason,
            delta_text=delta_text,
            logprobs=self.logprobs,
        )

    def failed(self, error: str) -> RequestOutput:
        """The last output of a request whose processing raised: what it had, and the error."""
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id, prompt=self.prompt, prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids, text=self.detokenizer.text, finish_reason="error", error=error,
        )
