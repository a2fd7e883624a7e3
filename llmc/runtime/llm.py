"""`LLM`: load an engine and generate for a list of prompts, in-flight batched."""

from __future__ import annotations

import os
from typing import Sequence as Seq

import torch

from llmc.runtime.llm_engine import LLMEngine
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampling_params import SamplingParams


class LLM:
    """An engine, loaded and ready to generate (see `LLMEngine` for the options)."""

    def __init__(
        self,
        engine: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        kv_cache_tokens: int | None = None,
        max_num_seqs: int | None = None,
    ):
        self.engine = LLMEngine(engine, device=device, kv_cache_tokens=kv_cache_tokens, max_num_seqs=max_num_seqs)
        self.tokenizer = self.engine.tokenizer

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
        # Check every prompt before queueing any, so a bad one leaves no request behind.
        token_ids = [self.engine.tokenize(p) for p in prompts]
        seqs = [self.engine.add_request(ids, sp) for ids, sp in zip(token_ids, params)]
        while not all(seq.is_finished for seq in seqs):
            self.engine.step()
        return [self.engine.output(seq, p if isinstance(p, str) else None) for seq, p in zip(seqs, prompts)]
