"""`LLM`: load an engine and generate for a list of prompts, in-flight batched."""

from __future__ import annotations

import os
from typing import Iterator, Sequence as Seq

from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


class LLM:
    """An engine, loaded and ready to generate.

    Options (device, kv_cache_tokens, kv_cache_memory, max_num_seqs, rank_timeout) are `LLMEngine`'s.
    An engine of several ranks starts one process per rank; `shutdown()` (or leaving a `with LLM(...)`
    block, or the program's exit) stops them.
    """

    def __init__(self, engine: str | os.PathLike, **options):
        self.engine = LLMEngine(engine, **options)
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), all in flight together; outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # Check every prompt and every params (a grammar compiles now) before queueing any, so a bad one leaves no request behind.
        token_ids = [self.engine.tokenize(p) for p in prompts]
        for sp in {id(sp): sp for sp in params}.values():
            self.engine.check_params(sp)
        ids = [
            self.engine.add_request(t, sp, prompt=p if isinstance(p, str) else None)
            for t, sp, p in zip(token_ids, params, prompts)
        ]
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            finished.update((out.request_id, out) for out in self.engine.step() if out.finished)
        return [finished[i] for i in ids]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding an output (with its `delta_text`) at every new token."""
        request_id = self.engine.add_request(
            self.engine.tokenize(prompt), sampling_params or SamplingParams(), prompt=prompt if isinstance(prompt, str) else None
        )
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)  # a consumer that stops early frees the request
