"""`LLMEngine`: the synchronous core of the runtime. Requests go in; each `step()` advances all of them.

`LLM` (batch generation) and the server's async engine are thin drivers of this loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmc.backends import get_backend
from llmc.engine import EngineConfig, EngineError, verify_files
from llmc.runtime.block_manager import BlockManager
from llmc.runtime.model_runner import ModelRunner
from llmc.runtime.outputs import RequestOutput
from llmc.runtime.sampler import sample
from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.sequence import Sequence

DEFAULT_KV_CACHE_BYTES = 1 << 30


class LLMEngine:
    """An engine directory, loaded: tokenizer, program, KV cache, scheduler.

    kv_cache_tokens: capacity of the paged KV cache in tokens (default: room for max_num_seqs
    full-length sequences, within 1 GiB, and never less than one).
    """

    def __init__(
        self,
        engine: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        kv_cache_tokens: int | None = None,
        max_num_seqs: int | None = None,
    ):
        self.engine_dir = Path(engine)
        self.config = config = EngineConfig.load(self.engine_dir)
        verify_files(self.engine_dir, config)
        if config.world_size != 1:
            raise EngineError(f"{engine} has {config.world_size} ranks; this runtime runs single-rank engines")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.engine_dir / "tokenizer")
        self.device = torch.device(device)
        program = get_backend(config.backend).load_rank(self.engine_dir / "rank0", self.device)

        limits, kv = config.limits, config.kv_cache
        self.max_seq_len = limits["max_seq_len"]
        block_size = kv["block_size"]
        bytes_per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * getattr(torch, config.dtype).itemsize
        max_num_seqs = max_num_seqs or limits["max_num_seqs"]
        if kv_cache_tokens is None:
            kv_cache_tokens = min(max_num_seqs * self.max_seq_len, DEFAULT_KV_CACHE_BYTES // bytes_per_token)
            kv_cache_tokens = max(kv_cache_tokens, self.max_seq_len)
        if kv_cache_tokens < self.max_seq_len:
            raise ValueError(
                f"a KV cache of {kv_cache_tokens} tokens cannot hold one request of max_seq_len={self.max_seq_len}; "
                "give it more tokens, or build the engine with a smaller --max-seq-len"
            )
        num_blocks = -(-kv_cache_tokens // block_size)
        self.runner = ModelRunner(program, config, num_blocks, self.device)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size), limits["max_batch_tokens"], max_num_seqs)
        self.eos_token_ids = set(config.eos_token_ids)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> checked token ids (raises ValueError naming the problem)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the engine holds at most {self.max_seq_len} tokens per request "
                f"(prompt plus at least one generated token); shorten the prompt or rebuild with a larger --max-seq-len"
            )
        return ids

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        seq = Sequence(prompt_token_ids, params, request_id)
        self.scheduler.add(seq)
        return seq

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Sequence]:
        """One in-flight batching step; returns the sequences that got a new token."""
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("the scheduler could not make progress (KV cache too small for any request)")
        logits, sampled = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed_tokens += n
        for seq, token in zip(sampled, sample(logits, sampled)):
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
        return sampled

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return "stop"
        if len(seq.output_token_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None

    def output(self, seq: Sequence, prompt: str | None = None) -> RequestOutput:
        tokens = seq.output_token_ids
        return RequestOutput(
            request_id=seq.request_id,
            prompt=prompt,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=seq.finish_reason,
        )
