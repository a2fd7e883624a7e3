"""Next-token sampling: penalties, bad words, logit bias, temperature, top-k, top-p, min-p; each request with its own generator.

Every value SamplingParams admits samples without error: logits that penalties overflow are clamped, the
temperature divides logits whose maximum is 0, and a distribution that is still not finite falls back to argmax.

The batch is sampled at once: the filters run as one torch call per kind over all sampled rows, and each row
draws one uniform number from its own generator (seeded requests) and takes its token by inverse CDF, so a
seeded request's tokens do not depend on what else is in the batch. Penalties, bad words, logit bias and
logprobs are per-request data, applied row by row to the rows that ask for them.
"""

from __future__ import annotations

import torch

from llmc.runtime.sampling_params import SamplingParams
from llmc.runtime.sequence import Sequence


def apply_penalties(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        values = row[seen]
        row = row.index_put((seen,), torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty))
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        counts = torch.bincount(torch.tensor(seq.output_token_ids), minlength=row.numel()).float()
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return row


def ban_bad_words(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """A banned token sequence's last token cannot follow the rest of it (HF's NoBadWordsLogitsProcessor)."""
    ids = seq.token_ids
    banned = [w[-1] for w in seq.params.bad_words_ids if len(w) == 1 or ids[-(len(w) - 1):] == w[:-1]]
    return row.index_fill(0, torch.tensor(banned, dtype=torch.long), float("-inf")) if banned else row


def before_min_tokens(seq: Sequence) -> bool:
    return seq.min_tokens_ban is not None and len(seq.output_token_ids) < seq.params.min_tokens


def adjust_logits(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Penalties, bad words, the min_tokens ban and logit bias; +inf (an overflowing penalty) becomes the
    largest float, NaN impossible."""
    p = seq.params
    row = apply_penalties(row, seq) if p.penalized else row
    row = ban_bad_words(row, seq) if p.bad_words_ids else row
    if before_min_tokens(seq):  # EOS and stop tokens cannot end the output yet
        row = row.index_fill(0, seq.min_tokens_ban, float("-inf"))
    if seq.logit_bias is not None:
        row = row.index_add(0, *seq.logit_bias)
    return row.nan_to_num(nan=float("-inf"), posinf=torch.finfo(row.dtype).max, neginf=float("-inf"))


def filter_logits(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks, on rows [len(params), vocab], each row with its params."""
    vocab, inf = rows.shape[-1], float("inf")

    def column(values):
        return torch.tensor(values, dtype=rows.dtype).unsqueeze(1)

    rows = (rows - rows.amax(-1, keepdim=True)) / column([p.temperature for p in params])  # <= 0 with a 0 at the top: no overflow
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        values = torch.topk(rows, max(top_k)).values
        kth = torch.where(column(top_k) > 0, values.gather(1, (column(top_k).long() - 1).clamp_min(0)), -inf)
        rows = rows.masked_fill(rows < kth, -inf)
    if any(p.top_p < 1.0 for p in params):
        sorted_logits, order = rows.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them reaches top_p; the first token always stays (top_p 1: none dropped).
        drop = probs.cumsum(-1) - probs >= column([p.top_p if p.top_p < 1.0 else inf for p in params])
        rows = rows.scatter(1, order, sorted_logits.masked_fill(drop, -inf))
    if any(p.min_p > 0 for p in params):
        probs = rows.softmax(-1)
        rows = rows.masked_fill(probs < column([p.min_p for p in params]) * probs.amax(-1, keepdim=True), -inf)
    return rows


def draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row of probs (rows summing to more than 0), by inverse CDF on one uniform number per row:
    from the sequence's generator where it has one, else from torch's global generator."""
    u = torch.rand(len(seqs), dtype=torch.float64)
    for i, seq in enumerate(seqs):
        if seq.generator is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=seq.generator)
    cdf = probs.double().cumsum(-1)
    picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)
    # u * total can round up to the total: then take the last token that has any probability.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.where(probs.gather(1, picks.unsqueeze(1)).squeeze(1) > 0, picks, last)


def top_logprobs(logprobs: torch.Tensor, token: int, n: int) -> dict[int, float]:
    """The chosen token's log-probability and the n likeliest, under the model's raw distribution."""
    values, ids = logprobs.topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
    return {token: logprobs[token].item(), **dict(zip(ids.tolist(), values.tolist()))}


def prompt_logprobs(rows: torch.Tensor, next_tokens: list[int], n: int) -> list[dict[int, float]]:
    """Per row (float32 logits at a prompt position), the next prompt token's logprob and the n likeliest."""
    logprobs = rows.log_softmax(-1)
    return [top_logprobs(lp, token, n) for lp, token in zip(logprobs, next_tokens)]


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row, batched (numpy's argmax is vectorized: 10x torch's on CPU)."""
    return logits.float().cpu().numpy().argmax(-1).tolist()


def needs_adjusting(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.penalized or p.bad_words_ids or p.logit_bias or before_min_tokens(seq))


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [len(seqs), vocab] (float32, after any grammar mask) -> one token id per sequence."""
    tokens = greedy_tokens(logits)
    adjusted = [i for i, seq in enumerate(seqs) if needs_adjusting(seq)]
    rows = logits
    if adjusted:
        rows = logits.clone()
        for i in adjusted:
            rows[i] = adjust_logits(logits[i], seqs[i])
            tokens[i] = int(rows[i].argmax())
    sampled = [i for i, seq in enumerate(seqs) if not seq.params.greedy]
    if sampled:
        probs = filter_logits(rows[sampled], [seqs[i].params for i in sampled]).softmax(-1)
        ok = (torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0)).tolist()  # else the argmax stands
        picks = draw(probs.nan_to_num(0.0, 0.0, 0.0), [seqs[i] for i in sampled]).tolist()
        for i, good, pick in zip(sampled, ok, picks):
            tokens[i] = pick if good else tokens[i]
    return tokens


def token_logprobs(row: torch.Tensor, token: int, seq: Sequence) -> dict[int, float] | None:
    """The chosen token's logprobs if the request asks for them, from its row as the model gave it (before any
    grammar mask: logprobs are the model's, as vLLM's)."""
    return top_logprobs(row.log_softmax(-1), token, seq.params.logprobs) if seq.params.logprobs is not None else None


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [len(seqs), vocab] -> one token id per sequence, and its logprobs where asked for."""
    logits = logits.float()
    tokens = sample_tokens(logits, seqs)
    return tokens, [token_logprobs(row, token, seq) for row, token, seq in zip(logits, tokens, seqs)]
