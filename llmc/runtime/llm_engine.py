"""`LLMEngine`: the synchronous core of the runtime. Requests go in; each `step()` advances all of them.

`LLM` (batch generation) and the server's async engine are thin drivers of this loop.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from pathlib import Path

import torch

from llmc.engine import EngineConfig, load_tokenizer, verify_files
from llmc.runtime.block_manager import BlockManager
from llmc.runtime.executor import LocalExecutor, MultiprocExecutor, TorchrunExecutor
from llmc.runtime.model_runner import prepare_inputs
from llmc.runtime.outputs import RequestOutput, RequestState
from llmc.runtime.sampler import greedy_tokens, sample_one
from llmc.runtime.sampling_params import InvalidParam, SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.worker import torchrun_rank
from llmc.runtime.sequence import Sequence

DEFAULT_KV_CACHE_BYTES = 1 << 30
log = logging.getLogger("llmc")


class LLMEngine:
    """An engine directory, loaded: tokenizer, ranks (each with its program and KV cache), schedulers.

    The paged KV cache holds `kv_cache_tokens` tokens, or as many as fit in `kv_cache_memory` GiB
    (per rank); by default room for max_num_seqs full-length requests within 1 GiB, and never less
    than one. An engine of several ranks runs one process per rank; a rank that dies, or returns
    nothing for `rank_timeout` seconds, stops them all with an error.

    With pipeline parallelism, requests are spread over pp schedulers (vLLM's virtual engines) that
    share the KV blocks; each keeps one step in flight, so every stage works on some step at once.
    """

    def __init__(
        self,
        engine: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        kv_cache_tokens: int | None = None,
        kv_cache_memory: float | None = None,
        max_num_seqs: int | None = None,
        enable_prefix_caching: bool = True,
        rank_timeout: float = 60.0,
    ):
        if kv_cache_tokens is not None and kv_cache_memory is not None:
            raise ValueError("give the KV cache size as kv_cache_tokens or as kv_cache_memory, not both")
        self.engine_dir = Path(engine)
        self.config = config = EngineConfig.load(self.engine_dir)
        verify_files(self.engine_dir, config)
        self.tokenizer = load_tokenizer(self.engine_dir, config)
        self.device = torch.device(device)

        limits = config.limits
        self.max_seq_len = limits["max_seq_len"]
        self.block_size = block_size = config.kv_cache["block_size"]
        itemsize = getattr(torch, config.kv_cache["dtype"]).itemsize
        bytes_per_token = max(
            2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * itemsize for kv in (r["kv_cache"] for r in config.ranks)
        )
        max_num_seqs = max_num_seqs or limits["max_num_seqs"]
        if kv_cache_memory is not None:
            kv_cache_tokens = int(kv_cache_memory * (1 << 30)) // bytes_per_token
        if kv_cache_tokens is None:
            kv_cache_tokens = min(max_num_seqs * self.max_seq_len, DEFAULT_KV_CACHE_BYTES // bytes_per_token)
            kv_cache_tokens = max(kv_cache_tokens, self.max_seq_len)
        if kv_cache_tokens < self.max_seq_len:
            raise ValueError(
                f"a KV cache of {kv_cache_tokens} tokens ({kv_cache_tokens * bytes_per_token / (1 << 30):.3g} GiB) cannot hold "
                f"one request of max_seq_len={self.max_seq_len} ({self.max_seq_len * bytes_per_token / (1 << 30):.3g} GiB); "
                "give it more memory, or build the engine with a smaller --max-seq-len"
            )
        num_blocks = -(-kv_cache_tokens // block_size)
        if config.world_size == 1:
            self.executor = LocalExecutor(self.engine_dir, config, num_blocks, self.device)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"{engine} has {config.world_size} ranks; this runtime runs them on CPU (gloo)")
            started_by_torchrun = torchrun_rank() is not None
            executor = TorchrunExecutor if started_by_torchrun else MultiprocExecutor
            self.executor = executor(self.engine_dir, config, num_blocks, rank_timeout)
        rope = config.rope or {}
        # Keys rotated by length-dependent RoPE depend on the sequence's length, not only on the tokens before them.
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching and not rope)
        self.schedulers: list[Scheduler] = []
        for _ in range(config.mapping["pp"]):  # peers: they share the max_num_seqs cap
            self.schedulers.append(Scheduler(self.block_manager, limits["max_batch_tokens"], max_num_seqs, peers=self.schedulers,
                                             recompute_above=rope.get("recompute_above")))
        self.in_flight: deque[tuple[Scheduler, list, list]] = deque()  # (scheduler, batch, sampled) in submission order
        self.eos_token_ids = set(config.eos_token_ids)
        self.requests: dict[str, RequestState] = {}  # in flight, by request id
        self.scheduler_of: dict[str, Scheduler] = {}

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string is at least as long as its text)."""
        return max(map(len, self.tokenizer.get_vocab()))

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> checked token ids (raises ValueError naming the problem).

        A text too long to fit in max_seq_len tokens of max_token_chars characters each is refused
        before the tokenizer sees it, so that a huge prompt costs nothing.
        """
        if isinstance(prompt, str):
            try:
                prompt.encode()
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt is not valid Unicode: {e.reason} at character {e.start} ({prompt[e.start:e.end]!r}); send UTF-8 text") from None
            most = (self.max_seq_len - 1) * self.max_token_chars
            if len(prompt) > most:
                raise ValueError(
                    f"prompt has {len(prompt)} characters, more than the engine's {self.max_seq_len} tokens per request can hold "
                    f"(at most {most} characters); shorten the prompt or rebuild with a larger --max-seq-len"
                )
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

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids within this engine's vocabulary (raises InvalidParam)."""
        vocab = self.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidParam("logit_bias", f"logit_bias has token ids outside the vocabulary [0, {vocab})")

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, prompt: str | None = None
    ) -> str:
        """Queue a request (token ids from `tokenize`); returns its id."""
        self.check_params(params)
        seq = Sequence(prompt_token_ids, params, request_id)
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in flight")
        self.requests[seq.request_id] = RequestState(seq, self.tokenizer, prompt)
        scheduler = min(self.schedulers, key=lambda s: len(s.waiting) + len(s.running))
        self.scheduler_of[seq.request_id] = scheduler
        scheduler.add(seq)
        return seq.request_id

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.scheduler_of.pop(request_id).abort(state.seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """One in-flight batching step; returns an output for every request that got a new token.

        Every scheduler without a step in flight submits one; then the oldest step's logits are sampled.
        """
        busy = [s for s, _, _ in self.in_flight]
        for scheduler in self.schedulers:
            if scheduler not in busy and scheduler.has_unfinished():
                batch = scheduler.schedule()
                if batch:
                    inputs, sampled = prepare_inputs(batch, self.block_size)
                    self.executor.submit(inputs)
                    self.in_flight.append((scheduler, batch, sampled))
        if not self.in_flight:
            raise RuntimeError("the scheduler could not make progress (KV cache too small for any request)")
        scheduler, batch, sampled = self.in_flight.popleft()
        logits = self.executor.result()[: len(sampled)]
        for seq, n in batch:
            seq.num_computed_tokens += n
        live = [i for i, seq in enumerate(sampled) if seq.request_id in self.requests]  # not aborted meanwhile
        if len(live) < len(sampled):
            logits, sampled = logits[live], [sampled[i] for i in live]
        # Each request's sampling, detokenization and stop matching: one that fails ends alone, with its error.
        logits = logits.float()
        outputs = []
        for seq, row, greedy_token in zip(sampled, logits, greedy_tokens(logits)):
            state = self.requests[seq.request_id]
            try:
                token, token_logprobs = sample_one(row, seq, greedy_token)
                seq.token_ids.append(token)
                delta = state.append(token, token_logprobs)
                reason = self._finish_reason(seq, token, state)
                if reason:
                    self._finish(scheduler, seq, reason)
                outputs.append(state.output(delta))
            except Exception as e:
                log.exception("request %s failed; ending it alone", seq.request_id)
                if seq.request_id in self.requests:
                    self._finish(scheduler, seq, "error")
                outputs.append(state.failed(f"{type(e).__name__}: {e}"))
        return outputs

    def shutdown(self) -> None:
        """Stop the engine's rank processes (if any); the engine cannot step afterwards."""
        self.executor.shutdown()

    def _finish(self, scheduler: Scheduler, seq: Sequence, reason: str) -> None:
        scheduler.finish(seq, reason)
        del self.requests[seq.request_id]
        del self.scheduler_of[seq.request_id]

    def _finish_reason(self, seq: Sequence, token: int, state: RequestState) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids or state.detokenizer.stopped:
            return "stop"
        if len(seq.output_token_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None
