"""Prefix caching: requests share the K/V of a common prefix, and their answers do not change."""

from __future__ import annotations

import pytest
import torch

import llmc
from llmc import LLM, SamplingParams
from llmc.runtime.block_manager import BlockManager
from llmc.runtime.sequence import Sequence

from conftest import VOCAB

BS = 16  # llmc.build's default block size
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def engine(checkpoints, tmp_path_factory):
    return llmc.build(checkpoints["qwen2"], tmp_path_factory.mktemp("e") / "engine", max_seq_len=128, max_batch_tokens=32, log=lambda _: None)


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def prompts():
    """Four prompts behind a shared 53-token prefix (three full blocks and 5 tokens), and one unrelated prompt."""
    prefix = random_tokens(3 * BS + 5, seed=0)
    return [prefix + random_tokens(n, seed=n) for n in (4, 11, 20, 1)] + [random_tokens(30, seed=99)]


def uncached(engine, **kwargs) -> LLM:
    return LLM(engine, enable_prefix_caching=False, **kwargs)


def alone(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def plain(engine):
    """The engine with prefix caching off: what every answer must equal."""
    return uncached(engine)


@pytest.fixture(scope="module")
def reference(plain, prompts):
    return alone(plain, prompts)


def test_requests_one_after_another_share_the_prefix(engine, prompts, reference):
    llm = LLM(engine)
    assert alone(llm, prompts) == reference
    blocks = llm.engine.block_manager
    # The first request misses; the next three each share the prefix's three full blocks; the last misses.
    assert blocks.prefix_cache_hits == 3 * 3 * BS
    assert blocks.prefix_cache_queries == sum(len(p) for p in prompts)
    assert len(blocks.free_blocks) == blocks.num_blocks and blocks.usage == 0


def test_requests_in_one_batch_share_the_prefix(engine, prompts, reference):
    llm = LLM(engine)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == reference
    # The first prompt's prefill is chunked (32 tokens a step), so the others find its first blocks.
    assert llm.engine.block_manager.prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in llm.generate(prompts + prompts, GREEDY)] == reference + reference


@pytest.mark.parametrize("length", [3 * BS, 3 * BS + 5], ids=["whole-blocks", "part-block"])
def test_a_prompt_entirely_in_the_cache(engine, plain, length, prompts):
    prompt = prompts[0][:length]
    expected = alone(plain, [prompt])
    llm = LLM(engine)
    assert alone(llm, [prompt, prompt]) == expected * 2
    # Its last token is computed again for its logits: with whole blocks, that takes the last block.
    assert llm.engine.block_manager.prefix_cache_hits == (length - 1) // BS * BS


def test_preemption_with_a_small_cache_and_shared_prefixes(engine, plain, prompts):
    params = SamplingParams(max_tokens=16, temperature=0)
    expected = alone(plain, prompts, params)
    llm = LLM(engine, kv_cache_tokens=128)  # 8 blocks: preemptions, even with the prefix shared
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    blocks = llm.engine.block_manager
    assert llm.engine.schedulers[0].num_preemptions > 0 and blocks.prefix_cache_hits > 0
    assert len(blocks.free_blocks) == blocks.num_blocks and blocks.ref_counts == [0] * blocks.num_blocks


# The block manager alone, driven as the scheduler and the runner drive it.


def compute(blocks: BlockManager, seq: Sequence) -> None:
    """Admit seq, sharing its cached prefix, and compute all its tokens."""
    cached = blocks.cached_prefix(seq)
    n = len(seq) - len(cached) * blocks.block_size
    assert blocks.can_allocate(seq, n, cached)
    blocks.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    blocks.cache_blocks(seq)


def seq(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams())


def test_shared_blocks_are_reference_counted():
    blocks = BlockManager(8, 4)
    a, b = seq(range(10)), seq([*range(8), 50, 51, 52])
    compute(blocks, a)
    compute(blocks, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [blocks.ref_counts[i] for i in a.block_table] == [2, 2, 1]
    assert (blocks.prefix_cache_queries, blocks.prefix_cache_hits) == (21, 8)
    assert blocks.usage == 4 / 8
    a_blocks = a.block_table
    blocks.free(a)
    assert [blocks.ref_counts[i] for i in b.block_table] == [1, 1, 1] and len(blocks.free_blocks) == 5
    blocks.free(b)
    assert len(blocks.free_blocks) == 8 and blocks.usage == 0
    # Freed blocks keep their content: a hit takes them back out of the free queue.
    c = seq(range(9))
    compute(blocks, c)
    assert c.block_table[:2] == a_blocks[:2] and not set(c.block_table) & set(blocks.free_blocks)
    blocks.free(c)
    assert len(blocks.free_blocks) == 8


def test_the_last_token_is_always_computed():
    blocks = BlockManager(8, 4)
    compute(blocks, seq(range(8)))
    assert len(blocks.cached_prefix(seq(range(8)))) == 1
    assert len(blocks.cached_prefix(seq(range(9)))) == 2
    # Hashes are chained: the same tokens after a different block are a different block.
    compute(blocks, seq([100, 101, 102, 103, 4, 5, 6, 7]))
    assert len(blocks.hash_to_block) == 4


def test_least_recently_freed_blocks_are_reused_first_and_forgotten():
    blocks = BlockManager(4, 4)
    a, b = seq(range(8)), seq(range(100, 108))
    compute(blocks, a)
    a_blocks = a.block_table
    blocks.free(a)
    compute(blocks, b)
    b_blocks = b.block_table
    blocks.free(b)
    assert len(blocks.hash_to_block) == 4
    # a's blocks were freed first, and a prefix's tail goes before its head.
    c = seq(range(200, 203))
    compute(blocks, c)
    assert c.block_table == [a_blocks[1]]
    assert len(blocks.cached_prefix(seq(range(9)))) == 1
    assert len(blocks.hash_to_block) == len(blocks.block_to_hash) == 3
    d = seq(range(300, 306))
    compute(blocks, d)
    assert d.block_table == [a_blocks[0], b_blocks[1]]
    assert blocks.cached_prefix(seq(range(9))) == []
    assert blocks.cached_prefix(seq([*range(100, 108), 0])) == [b_blocks[0]]
    assert len(blocks.hash_to_block) == len(blocks.block_to_hash) == 2  # b's first block and d's full one
    blocks.free(c)
    blocks.free(d)
    assert len(blocks.free_blocks) == 4


def test_twins_computed_at_once_and_caching_off():
    blocks = BlockManager(8, 4)
    a, b = seq(range(8)), seq(range(9))
    for s in (a, b):  # both admitted before either publishes its blocks
        blocks.allocate(s, len(s))
    for s in (a, b):
        s.num_computed_tokens = len(s)
        blocks.cache_blocks(s)
    assert len(blocks.hash_to_block) == 2 and blocks.cached_prefix(seq(range(9))) == a.block_table
    blocks.free(a)
    blocks.free(b)
    assert len(blocks.free_blocks) == 8 and len(blocks.block_to_hash) == 2

    off = BlockManager(8, 4, enable_prefix_caching=False)
    for _ in range(2):
        s = seq(range(9))
        compute(off, s)
        off.free(s)
    assert (off.prefix_cache_queries, off.prefix_cache_hits, off.hash_to_block) == (0, 0, {})


def test_prefix_cache_with_sliding_window(checkpoints, tmp_path):
    """Mistral's sliding window (8 tokens, shorter than a shared 3-block prefix): hits give the same tokens."""
    engine = llmc.build(checkpoints["mistral"], tmp_path / "engine", max_seq_len=128, max_batch_tokens=32, log=lambda _: None)
    prefix = random_tokens(3 * BS + 2, seed=5)
    shared = [prefix + random_tokens(n, seed=50 + n) for n in (3, 9, 1)]
    cached = LLM(engine)
    got = [cached.generate([p], GREEDY)[0].outputs[0].token_ids for p in shared]
    assert cached.engine.block_manager.prefix_cache_hits > 0
    assert got == alone(uncached(engine), shared)
