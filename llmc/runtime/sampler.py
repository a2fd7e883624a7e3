"""Next-token sampling: greedy, temperature, top-k, top-p, each request with its own generator."""

from __future__ import annotations

import torch

from llmc.runtime.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [len(seqs), vocab] -> one token id per sequence."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop tokens once the mass before them reaches top_p; the first token always stays.
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return tokens
