"""The scheduler's work for one step, packed into the flat step inputs of docs/design.md's step contract, which
every backend's runner takes (on the driver; the arrays are cheap to send to ranks)."""

from __future__ import annotations

import numpy as np

from llmc.runtime.sequence import Sequence

Batch = list[tuple[Sequence, int]]


def prepare_inputs(batch: Batch, block_size: int) -> tuple[dict[str, np.ndarray], list[Sequence]]:
    """Step inputs (arrays, cheap to send to ranks), and the sequences whose next token this step yields."""
    inputs, sampled, _ = prepare_step(batch, block_size)
    return inputs, sampled


def prepare_step(batch: Batch, block_size: int) -> tuple[dict[str, np.ndarray], list[Sequence], list[tuple[Sequence, int, int]]]:
    """`prepare_inputs`, and the prompt positions whose logits this step also returns for prompt logprobs:
    (sequence, first, end) per sequence that scores its prompt. The step's logits rows are the sampled
    sequences' first, then each scored range's in turn (row of position p: the prediction of token p + 1)."""
    input_ids, positions, slots, seq_lens, starts, logits_indices, rope_seq_lens = [], [], [], [], [0], [], []
    sampled, scored, scored_rows = [], [], []
    for seq, n in batch:
        first = seq.num_computed_tokens
        input_ids += seq.token_ids[first : first + n]
        positions += range(first, first + n)
        # the length whose RoPE frequencies a token takes (llmc/frontend/rope.py): its prefill's, or its own
        rope_seq_lens += [max(p + 1, seq.rope_prefill_len) for p in range(first, first + n)]
        slots += [seq.block_table[p // block_size] * block_size + p % block_size for p in range(first, first + n)]
        seq_lens.append(first + n)
        starts.append(starts[-1] + n)
        if first + n == len(seq):  # its last token is computed: it gets a new one
            logits_indices.append(starts[-1] - 1)
            sampled.append(seq)
        if seq.prompt_logprobs is not None:  # positions whose next prompt token is not scored yet
            lo, hi = max(first, len(seq.prompt_logprobs) - 1), min(first + n, seq.num_prompt_tokens - 1)
            if lo < hi:
                scored.append((seq, lo, hi))
                scored_rows += range(starts[-2] + lo - first, starts[-2] + hi - first)
    width = max(len(seq.block_table) for seq, _ in batch)
    block_tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]
    inputs = {
        "input_ids": np.array([input_ids], dtype=np.int64),
        "position_ids": np.array([positions], dtype=np.int64),
        "rope_seq_lens": np.array([rope_seq_lens], dtype=np.int64),
        # A step of prompt chunks only still needs one row of logits to trace through; it is dropped.
        "logits_indices": np.array(logits_indices + scored_rows or [0], dtype=np.int64),
        "slot_mapping": np.array(slots, dtype=np.int64),
        "block_tables": np.array(block_tables, dtype=np.int32),
        "seq_lens": np.array(seq_lens, dtype=np.int32),
        "query_start_loc": np.array(starts, dtype=np.int32),
    }
    return inputs, sampled, scored
