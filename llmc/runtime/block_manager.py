"""KV-cache blocks: reference counts, a free queue, each sequence's block table, and the prefix cache.

A full block whose K/V are computed is published under a chained hash (its predecessor's hash and
its own token ids), so one hash names a whole prefix. A new request shares the longest run of its
full blocks that is published instead of computing it again. A block whose last reference goes
keeps its hash while it waits in the free queue; it is forgotten only when handed out for new
content, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from llmc.runtime.sequence import Sequence


def block_hash(prev: bytes, token_ids: list[int]) -> bytes:
    # SHA-256, not Python's 64-bit hash(): a collision would silently give one prompt another's K/V.
    return hashlib.sha256(prev + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Blocks no sequence holds, oldest first (an ordered set: a prefix hit takes one from the middle).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.block_to_hash: dict[int, bytes] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of seq's first num_blocks blocks, memoized on seq (its tokens never change)."""
        bs, hashes = self.block_size, seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold the start of seq's tokens, longest run first to last."""
        if not self.enable_prefix_caching or seq.scores_prompt:
            return []
        blocks = []
        # Stop short of the last token: it must be computed to give the logits of the next one.
        for h in self._hashes(seq, (len(seq) - 1) // self.block_size):
            if h not in self.hash_to_block:
                break
            blocks.append(self.hash_to_block[h])
        return blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[int] | tuple = ()) -> int:
        """Free blocks it takes to share `cached` (a prefix, on admission) and then compute num_new_tokens."""
        total = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        new = max(0, -(-total // self.block_size) - len(seq.block_table) - len(cached))
        # A cached block that sits in the free queue stops being free once shared.
        return new + sum(self.ref_counts[b] == 0 for b in cached)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | tuple = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, cached) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | tuple = ()) -> None:
        if not seq.block_table:  # admission: share the cached prefix, which is then computed
            if self.enable_prefix_caching:
                self.prefix_cache_queries += len(seq)
                self.prefix_cache_hits += len(cached) * self.block_size
            for b in cached:
                if self.ref_counts[b] == 0:
                    del self.free_blocks[b]
                self.ref_counts[b] += 1
            seq.block_table = list(cached)
            seq.num_cached_blocks = len(cached)
            seq.num_computed_tokens = len(cached) * self.block_size
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_to_hash.pop(block, None)
        if h is not None:  # its old content is about to be overwritten
            del self.hash_to_block[h]
        self.ref_counts[block] = 1
        return block

    def cache_blocks(self, seq: Sequence) -> None:
        """Publish seq's full blocks whose K/V are computed (call only once they are written)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            # Two requests may compute the same block at once; the first published stays the one.
            if hashes[i] not in self.hash_to_block:
                self.hash_to_block[hashes[i]] = seq.block_table[i]
                self.block_to_hash[seq.block_table[i]] = hashes[i]
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (publishing its computed blocks first, so a later request can reuse them)."""
        self.cache_blocks(seq)
        # Tail first: a block is no use without those before it, so a prefix's end should go first.
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None
                if b not in self.block_to_hash:  # holds nothing reusable: hand it out before cached ones
                    self.free_blocks.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed_tokens = seq.num_cached_blocks = 0

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached blocks nobody holds count as free)."""
        return 1 - len(self.free_blocks) / self.num_blocks
