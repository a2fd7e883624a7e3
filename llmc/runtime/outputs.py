"""What a request yields, shaped as vLLM's: a `RequestOutput` holding one `CompletionOutput` per sample,
built token by token by its `RequestState`."""

from __future__ import annotations

from dataclasses import dataclass

from llmc.runtime.detokenizer import IncrementalDetokenizer
from llmc.runtime.sequence import Sequence

Logprobs = list[dict[int, float]]  # per token: {chosen and top-n token id: logprob} (vLLM's values are Logprob objects)


@dataclass
class CompletionOutput:
    """One sample of a request, so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # the sum of its tokens' logprobs, where logprobs or best_of asked for them
    logprobs: Logprobs | None
    finish_reason: str | None  # "stop" (EOS, stop token or stop string), "length", "abort", "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, as vLLM's
    delta_text: str = ""  # llmc's: text added since the request's previous output (for streaming)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output so far (all of it once `finished`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None  # per prompt token, None for the first; where asked for
    outputs: list[CompletionOutput]  # n of them; once finished with best_of > n, the n likeliest, likeliest first
    finished: bool
    error: str | None = None  # llmc's: why the request failed (finish_reason "error"); the engine went on with the others


class SampleState:
    """The output side of one sample: its detokenizer, logprobs, and the text it added since the last output."""

    def __init__(self, seq: Sequence, tokenizer, wants_cumulative: bool):
        self.seq = seq
        p = seq.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.token_ids, p.skip_special_tokens, p.stop, p.include_stop_str_in_output)
        self.logprobs: Logprobs | None = [] if p.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if wants_cumulative else None
        self.delta = ""
        self.flushed = False
        self.stop_reason: int | str | None = None

    def append(self, token: int, logprobs: dict[int, float] | None, logprob: float | None) -> None:
        """Record a new token (logprob: its own, where the cumulative logprob is kept)."""
        if self.logprobs is not None:
            self.logprobs.append(logprobs)
        if self.cumulative_logprob is not None:
            self.cumulative_logprob += logprob
        self.delta += self.detokenizer.add(token, match_stops=len(self.seq.output_token_ids) >= self.seq.params.min_tokens)

    def output(self) -> CompletionOutput:
        seq = self.seq
        if seq.finish_reason is not None and not self.flushed:
            self.delta += self.detokenizer.flush()
            self.flushed = True
        out = CompletionOutput(
            index=seq.index, text=self.detokenizer.text, token_ids=seq.output_token_ids, cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs, finish_reason=seq.finish_reason, stop_reason=self.stop_reason, delta_text=self.delta,
        )
        self.delta = ""
        return out


class RequestState:
    """The output side of one request: its samples' states and its prompt logprobs."""

    def __init__(self, seqs: list[Sequence], tokenizer, prompt: str | None = None):
        self.seqs = seqs
        self.prompt = prompt
        params = seqs[0].params
        self.n = params.n
        wants_cumulative = params.logprobs is not None or params.num_samples > params.n
        self.samples = [SampleState(seq, tokenizer, wants_cumulative) for seq in seqs]

    @property
    def finished(self) -> bool:
        return all(seq.finish_reason is not None for seq in self.seqs)

    def output(self, error: str | None = None) -> RequestOutput:
        """The request's output now; `error`: it failed, and this is its last."""
        seq = self.seqs[0]
        outputs = [s.output() for s in self.samples]
        finished = error is not None or self.finished
        if finished and len(outputs) > self.n:  # best_of: the n of highest cumulative logprob
            outputs = sorted(outputs, key=lambda o: -o.cumulative_logprob)[: self.n]
        if error is not None:
            for o in outputs:
                o.finish_reason = "error"
        return RequestOutput(
            request_id=seq.request_id, prompt=self.prompt, prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            prompt_logprobs=seq.prompt_logprobs, outputs=outputs, finished=finished, error=error,
        )
