"""Incremental (streaming) detokenization with stop strings.

Why this is subtle: text is not a per-token function of ids. `decode(a + b) != decode(a) + decode(b)`:
- byte-level BPE (GPT-2, Llama 3, Qwen) and sentencepiece byte fallback (`<0xE4>`) split one UTF-8
  character over several tokens, so a prefix of the ids decodes to a trailing "\ufffd" that the next
  token turns into a real character;
- sentencepiece decoders (Metaspace "▁", Llama's `Strip`) drop the space of the *first* token decoded,
  so decoding the output alone loses the space that follows the prompt;
- the `ByteFallback` decoder turns a whole run of byte tokens into "\ufffd"s when the run is not valid
  UTF-8, so a later stray byte token can change characters that already decoded fine.
So, as vLLM's `detokenize_incrementally` does, we decode a short window of ids that starts with a few
already-finalized tokens (`ids[:read]`, initially the prompt's tail), emit only what the new tokens add to
that context's text, and only once it cannot change any more: not while it ends in "\ufffd" (maybe an
incomplete character) or a byte-fallback run is open; then the emitted tokens become the next context.
Stop strings: text that could still become the start of a stop string is held back too, so a streaming
client never sees characters that a stop string later removes. `flush()` releases the rest.
"""

from __future__ import annotations

import os
import re

CONTEXT = 5  # prompt tokens decoded as context before the first output token
LOOKAHEAD = 3  # tokens after which a trailing "\ufffd" is certainly an invalid byte, not an incomplete one
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._stops = [s for s in (stop or []) if s]
        self._include = include_stop_str_in_output
        added = tokenizer.added_tokens_decoder.items()
        self._special = {i for i, t in added if t.special} if skip_special_tokens else set()  # what decode skips
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_fallback = backend is None or "ByteFallback" in repr(backend.decoder)
        self._text, self._emitted, self._stopped, self._open_run = "", 0, False, False
        self._match_stops = True
        self.stop_string: str | None = None  # the stop string that ended the text
        # Context: the prompt's last CONTEXT tokens; more if needed so that it holds a token that is not
        # skipped (the first decoded token loses its sentencepiece space: it must not be an output token)
        # and does not begin inside a byte-fallback run (which decodes as a whole).
        prompt = list(prompt_token_ids[-64:])
        start = max(len(prompt) - CONTEXT, 0)
        while start > 0 and len(prompt) - start < 64 and (
            all(i in self._special for i in prompt[start:])
            or (self._byte_fallback and self._is_byte(prompt[start]) and self._is_byte(prompt[start - 1]))
        ):
            start -= 1
        self._ids, self._read = prompt[start:], len(prompt) - start
        for i in self._ids:
            self._note_byte_run(i)
        self._context_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def _is_byte(self, token_id: int) -> bool:
        return bool(_BYTE_TOKEN.fullmatch(self._tok.convert_ids_to_tokens(token_id) or ""))

    def _note_byte_run(self, token_id: int) -> None:
        if self._byte_fallback and token_id not in self._special:  # skipped tokens do not end a run
            self._open_run = self._is_byte(token_id)

    def add(self, token_id: int, match_stops: bool = True) -> str:
        """Append one generated token; return the newly finalized text (possibly "").
        With match_stops False (before min_tokens), the text it adds cannot end the output at a stop string."""
        if self._stopped:
            return ""
        self._ids.append(token_id)
        self._note_byte_run(token_id)
        self._match_stops = match_stops
        self._step(final=False)
        return self._release()

    def flush(self) -> str:
        """At the end: the text still held back (incomplete bytes become "\ufffd", as `decode` does)."""
        if not self._stopped:
            self._step(final=True)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """All output text released so far (= the concatenation of the deltas); cut at a matched stop string."""
        return self._text[:self._emitted]

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _step(self, final: bool) -> None:
        ids, end = self._ids, len(self._ids)
        text = full = self._decode(ids)
        if not final and (self._open_run or full.endswith("\ufffd")):
            if self._open_run:
                return
            # Hold an incomplete character; but once LOOKAHEAD non-skipped tokens (>= 1 byte each) follow a
            # position, the text up to it is final even if it ends in "\ufffd" (an invalid byte), so a run of
            # invalid bytes cannot stall the stream or grow the window without bound.
            seen = 0
            while end > self._read and seen < LOOKAHEAD:
                end -= 1
                seen += ids[end] not in self._special
            if seen < LOOKAHEAD or end <= self._read:
                return
            text = self._decode(ids[:end])
            if not full.startswith(text):
                return
        # The context's text is a prefix of `text`, except where the prompt ended inside a character ("\ufffd"):
        # then the completed character is output text.
        done = len(os.path.commonprefix([text, self._context_text]))
        if len(text) <= done:
            return
        del ids[:self._read]  # the new context is ids[read:end]
        self._read = end - self._read
        self._context_text = self._decode(ids[:self._read])
        self._append(text[done:])

    def _append(self, delta: str) -> None:
        start = len(self._text)
        self._text += delta
        if not self._match_stops:
            return
        best = None  # the stop string that is complete first (then the longest): ((end, begin), begin, s)
        for s in self._stops:
            i = self._text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < best[0]):
                best = ((i + len(s), i), i, s)
        if best is not None:
            _, i, s = best
            self._text = self._text[:i + len(s) if self._include else i]
            self._stopped = True
            self.stop_string = s

    def _release(self, final: bool = False) -> str:
        end = len(self._text)
        if not (final or self._stopped or self._include):
            for s in self._stops:  # hold back the longest suffix that begins a stop string
                k = next((k for k in range(min(len(s) - 1, end), 0, -1) if self._text.endswith(s[:k])), 0)
                end = min(end, len(self._text) - k)
        end = max(end, self._emitted)
        delta, self._emitted = self._text[self._emitted:end], end
        return delta
