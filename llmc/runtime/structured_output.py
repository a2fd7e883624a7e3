"""Structured output through xgrammar: grammars compiled once per engine, a matcher per request, a
token bitmask over the batch's logits.

Each guided request holds a `GrammarMatcher`, advanced by every token it accepts; the step masks
the logits of the guided rows to the tokens the grammar allows next, before any sampling (greedy
included). The engine's EOS tokens are the grammar's stop tokens: EOS is allowed only where the
grammar accepts, and once the grammar is complete only EOS is. A preempted request keeps its
matcher (its tokens are recomputed, not regenerated); a finished or aborted one drops it.
"""

from __future__ import annotations

import json
import re

import torch

from llmc.runtime.guided_decoding_params import GuidedDecodingParams
from llmc.runtime.sampling_params import InvalidParam

CACHE_BYTES = 256 << 20
_CPP_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[02:41:21] /project/cpp/regex_converter.cc:94: " before xgrammar's messages


class StructuredOutput:
    """One engine's grammar compiler (its tokenizer's vocabulary, read once) and its compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import xgrammar  # imported on the first guided request: it costs seconds, and most engines never need it

        self.xgr = xgrammar
        self.vocab_size = vocab_size
        # Without EOS tokens in the engine's config, xgrammar takes the tokenizer's.
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(eos_token_ids) or None)
        # Compiled grammars are cached by their text; least recently used ones go past CACHE_BYTES.
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=True, cache_limit_bytes=CACHE_BYTES)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)  # grown to the largest batch seen

    def compile(self, guided: GuidedDecodingParams):
        """The compiled grammar (from the cache where it was compiled before); InvalidParam naming the field if it does not compile."""
        kind = guided.kind
        try:
            if kind in ("json", "json_object"):
                schema = guided.schema_text if kind == "json" else '{"type": "object"}'
                return self.compiler.compile_json_schema(schema, any_whitespace=not guided.disable_any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(guided.regex)
            if kind == "choice":  # EBNF's string literals take JSON's escapes
                return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in guided.choice))
            return self.compiler.compile_grammar(guided.grammar)
        except (RuntimeError, ValueError) as e:  # xgrammar's parsers raise RuntimeError
            message = _CPP_LOCATION.sub("", str(e)).strip()
            what = {"json": "the JSON schema", "regex": "the regex", "grammar": "the grammar"}.get(kind, kind)
            raise InvalidParam(f"guided_decoding.{kind}", f"{what} does not compile: {message}") from None

    def matcher(self, guided: GuidedDecodingParams):
        return self.xgr.GrammarMatcher(self.compile(guided))

    def mask_(self, logits: torch.Tensor, matchers: list) -> None:
        """Mask, in place, each row of logits [rows, vocab] (float32, CPU) whose matcher is not None to the tokens its grammar allows next."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if self._bitmask.shape[0] < len(matchers):
            self._bitmask = self.xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        bitmask = self._bitmask[: len(matchers)]
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

