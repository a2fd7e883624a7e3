"""In-flight batching: every step packs running sequences and new prefill chunks up to a token budget.

Running sequences go first (oldest first), so decodes are never stalled by a long prompt; what is
left of the budget goes to prompts, chunked (Sarathi-Serve's stall-free batching). When the cache
has no block for a running sequence, the newest running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed from its tokens.

An engine whose RoPE switches frequencies above some length the way Phi-3's does (`recompute_above`)
recomputes a sequence's cache from its tokens when it first grows past it, as transformers' generate does.

With prefix caching, a request admitted from the queue starts after the longest prefix of its tokens
already in the cache (see BlockManager); that prefix costs no budget.
"""

from __future__ import annotations

from collections import deque

from llmc.runtime.block_manager import BlockManager
from llmc.runtime.sequence import Sequence, Status


class Scheduler:
    """One step's worth of work at a time. Schedulers that share a block manager (the pp virtual
    engines) are given one list, `peers`, holding them all: `max_num_seqs` caps their running requests together."""

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_num_seqs: int, peers: list[Scheduler] | None = None,
                 recompute_above: int | None = None):
        self.block_manager = block_manager
        self.recompute_above = recompute_above
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.peers = peers if peers is not None else [self]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The step's work: (sequence, number of its tokens to compute now)."""
        # Last step's tokens are now in the cache, so their full blocks can be shared.
        for seq in self.running:
            self.block_manager.cache_blocks(seq)
        if self.recompute_above is not None:
            for seq in (*self.running, *self.waiting):
                if seq.rope_prefill_len <= self.recompute_above < len(seq):  # its cache holds short-factor keys
                    seq.rope_prefill_len, seq.num_computed_tokens = len(seq), 0
        budget = self.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below to make room for an older one
                continue
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if num_tokens == 0:
                break
            while not self.block_manager.can_allocate(seq, num_tokens):
                self._preempt(self.running[-1])
                if seq.status != Status.RUNNING:
                    break
            if seq.status == Status.RUNNING:
                self.block_manager.allocate(seq, num_tokens)
                batch.append((seq, num_tokens))
                budget -= num_tokens
        num_running = sum(len(s.running) for s in self.peers)
        while self.waiting and budget > 0 and num_running < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.cached_prefix(seq)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_tokens = min(seq.num_uncomputed_tokens - num_cached_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_tokens, cached):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_tokens, cached)
            seq.status = Status.RUNNING
            self.running.append(seq)
            num_running += 1
            batch.append((seq, num_tokens))
            budget -= num_tokens
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)  # publishes its computed blocks first: the recompute may hit them
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.block_manager.free(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is (its client went away); a running one frees its blocks."""
        if seq.status == Status.RUNNING:
            self.finish(seq, "abort")
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
            seq.finish_reason = "abort"
