"""Runs one scheduler step: packs the scheduled work into DESIGN.md's flat step inputs and calls the program."""

from __future__ import annotations

import torch

from llmc.engine import EngineConfig
from llmc.runtime.sequence import Sequence


class ModelRunner:
    def __init__(self, program: torch.nn.Module, config: EngineConfig, num_blocks: int, device: torch.device):
        self.program = program
        self.config = config
        self.device = device
        kv = config.kv_cache
        self.block_size = kv["block_size"]
        self.kv_cache = torch.zeros(
            (kv["num_layers"], 2, num_blocks, self.block_size, kv["num_kv_heads"], kv["head_dim"]),
            dtype=getattr(torch, config.dtype),
            device=device,
        )

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[dict[str, torch.Tensor], list[Sequence]]:
        """Step inputs, and the sequences whose next token this step yields (their last token is computed)."""
        input_ids, positions, slots, seq_lens, starts, logits_indices = [], [], [], [], [0], []
        sampled = []
        bs = self.block_size
        for seq, n in batch:
            first = seq.num_computed_tokens
            input_ids += seq.token_ids[first : first + n]
            positions += range(first, first + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(first, first + n)]
            seq_lens.append(first + n)
            starts.append(starts[-1] + n)
            if first + n == len(seq):
                logits_indices.append(starts[-1] - 1)
                sampled.append(seq)
        width = max(len(seq.block_table) for seq, _ in batch)
        block_tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in batch]

        def tensor(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=self.device)

        inputs = {
            "input_ids": tensor([input_ids]),
            "position_ids": tensor([positions]),
            # A step of prompt chunks only still needs one row of logits to trace through; it is dropped.
            "logits_indices": tensor(logits_indices or [0]),
            "kv_cache": self.kv_cache,
            "slot_mapping": tensor(slots),
            "block_tables": tensor(block_tables, torch.int32),
            "seq_lens": tensor(seq_lens, torch.int32),
            "query_start_loc": tensor(starts, torch.int32),
        }
        return {name: inputs[name] for name in self.config.inputs}, sampled

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [len(sampled), vocab] on the CPU, and the sequences they belong to."""
        inputs, sampled = self.prepare(batch)
        out = self.program(**inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        return logits[0, : len(sampled)].float().cpu(), sampled
