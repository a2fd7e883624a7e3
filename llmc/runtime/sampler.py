"""Next-token sampling: penalties, bad words, logit bias, temperature, top-k, top-p, min-p; each request with its own generator.

Every value SamplingParams admits samples without error: logits that penalties overflow are clamped, the
temperature divides logits whose maximum is 0, and a distribution that is still not finite falls back to argmax.
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


def filter_logits(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks."""
    row = (row - row.max()) / p.temperature  # <= 0 with a 0 at the top: no overflow, whatever the temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop tokens once the mass before them reaches top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs >= p.top_p
        row = row.scatter(0, order[drop], float("-inf"))
    if p.min_p > 0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return row


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


def sample_one(
    row: torch.Tensor, seq: Sequence, greedy_token: int, raw_row: torch.Tensor | None = None
) -> tuple[int, dict[int, float] | None]:
    """One sequence's next token from its logits row (float32) given the row's argmax; and its logprobs if asked for,
    from `raw_row` where `row` was masked by a grammar (logprobs are the model's, as vLLM's)."""
    p = seq.params
    token = greedy_token
    if p.penalized or p.bad_words_ids or p.logit_bias or not p.greedy or before_min_tokens(seq):  # else the argmax stands
        adjusted = adjust_logits(row, seq)
        token = int(adjusted.argmax())
        if not p.greedy:
            probs = filter_logits(adjusted, p).softmax(-1)
            if torch.isfinite(probs).all() and probs.sum() > 0:
                token = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    logprobs = top_logprobs((row if raw_row is None else raw_row).log_softmax(-1), token, p.logprobs) if p.logprobs is not None else None
    return token, logprobs


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [len(seqs), vocab] -> one token id per sequence, and its logprobs where asked for."""
    logits = logits.float()
    picks = [sample_one(logits[i], seq, token) for i, (seq, token) in enumerate(zip(seqs, greedy_tokens(logits)))]
    return [t for t, _ in picks], [lp for _, lp in picks]
