"""`LLM`: load an engine and generate for a list of prompts, in-flight batched."""

from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence as Seq

from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


# vLLM's names for llmc's build options.
VLLM_NAMES = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "quantization": "quant"}


class LLM:
    """An engine, loaded and ready to generate: an engine directory, or a Hugging Face checkpoint (a
    directory or hub id) whose engine is built into the cache the first time (`llmc.engine_cache`).

    Build options (`llmc.build`'s: dtype, tp, pp, quant, max_batch_tokens..., or vLLM's names
    tensor_parallel_size, pipeline_parallel_size, quantization) apply to a checkpoint; given with an
    engine they must match it. dtype defaults to "auto", the checkpoint's own. `max_model_len` is the
    engine's max_seq_len when built here, and a cap below it otherwise. The other options (device,
    kv_cache_tokens, kv_cache_memory, max_num_seqs, rank_timeout) are `LLMEngine`'s. An engine of
    several ranks starts one process per rank; `shutdown()` (or leaving a `with LLM(...)` block, or
    the program's exit) stops them.
    """

    def __init__(self, model: str | os.PathLike, *, log=lambda m: print(m, file=sys.stderr), **options):
        from llmc.engine_cache import BUILD_OPTIONS, is_engine, resolve_engine
        from llmc.runtime.executor import exit_if_importing_main

        exit_if_importing_main()  # before a build, too

        options = {VLLM_NAMES.get(k, k): v for k, v in options.items()}
        build = {k: options.pop(k) for k in list(options) if k in BUILD_OPTIONS and k != "max_num_seqs"}  # also a runtime cap
        if not is_engine(model):
            build.setdefault("dtype", "auto")
            if options.get("max_model_len") is not None:
                build["max_seq_len"] = options.pop("max_model_len")
        self.engine_dir = resolve_engine(model, log=log, **build)
        self.engine = LLMEngine(self.engine_dir, **options)
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
