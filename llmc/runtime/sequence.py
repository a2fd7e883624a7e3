"""A request as the scheduler sees it: its tokens, how many are in the KV cache, and its blocks."""

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
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        self.request_id = request_id if request_id is not None else str(next(_ids))
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
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        bias = params.logit_bias  # as tensors once, for the sampler's index_add at every step
        self.logit_bias = (torch.tensor(list(bias)), torch.tensor(list(bias.values()), dtype=torch.float32)) if bias else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
