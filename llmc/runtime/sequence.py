"""A request's sample as the scheduler sees it: its tokens, how many are in the KV cache, and its blocks.

A request with n / best_of > 1 has one Sequence per sample, all with the request's id, told apart by `index`."""

from __future__ import annotations

import enum
import itertools

import torch

from llmc.runtime.sampling_params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, index: int = 0):
        self.request_id = request_id if request_id is not None else str(next(_ids))
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        # The length whose RoPE frequencies its tokens take at least (length-dependent RoPE, llmc/frontend/rope.py):
        # its prompt's, or its length when a RoPE switch made it recompute its cache (Scheduler.recompute_above).
        self.rope_prefill_len = self.num_prompt_tokens
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of its full blocks so far (the block manager's memo)
        self.num_cached_blocks = 0  # leading blocks of block_table the prefix cache has already seen
        # A request's samples draw from seed, seed + 1, ... (as vLLM's): each its own stream, all reproducible.
        seed = params.seed if params.seed is None or index == 0 else (params.seed + index) % (1 << 64)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # The request's first sample scores the prompt: per prompt position, {token id: logprob} (None for the first).
        # It computes every prompt token itself (no prefix cache) until all are scored.
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] if params.prompt_logprobs is not None and index == 0 else None
        self.min_tokens_ban: torch.Tensor | None = None  # token ids that cannot come before min_tokens (set by the engine)
        bias = params.logit_bias  # as tensors once, for the sampler's index_add at every step
        self.grammar = None  # structured output: this sample's own xgrammar GrammarMatcher, advanced by each of its tokens
        self.logit_bias = (torch.tensor(list(bias)), torch.tensor(list(bias.values()), dtype=torch.float32)) if bias else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt tokens still need their logprobs (so their logits must be computed, not shared)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
