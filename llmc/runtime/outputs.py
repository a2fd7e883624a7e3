from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """One finished request: the generated tokens and their text."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens or max_seq_len)
