"""Sampling parameters of one request, named and defaulted as in vLLM, checked so that sampling cannot fail."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmc.runtime.guided_decoding_params import GuidedDecodingParams
from llmc.runtime.invalid_param import InvalidParam

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (dividing by them would only amplify noise)
MAX_STOP_STRINGS = 16  # stop strings are matched against every new token's text: bound the work per token
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20
MAX_SAMPLES = 128  # n / best_of: each sample holds KV blocks and a share of every step
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 bans a token, 100 all but forces it


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0: score the prompt only (prompt_logprobs), generate nothing
    n: int = 1  # outputs returned for the prompt
    best_of: int | None = None  # samples generated (>= n; default n); the n of highest cumulative logprob are returned
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the output before this many tokens
    temperature: float = 1.0  # 0 (or below 1e-5) means greedy
    top_k: int = 0  # 0 (or -1) keeps all tokens
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (HF's rule)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences never generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # return the chosen token's log-probability and this many of the top ones
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    guided_decoding: GuidedDecodingParams | None = None  # structured output: the grammar the text must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words_ids = [list(w) for w in self.bad_words_ids or []]
        self.logit_bias = dict(self.logit_bias or {})
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 0, f"max_tokens must be an integer >= 0, got {self.max_tokens!r}"),
            ("n", _is_int(self.n) and 1 <= self.n <= MAX_SAMPLES, f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}"),
            ("best_of", self.best_of is None or (_is_int(self.best_of) and self.n <= self.best_of <= MAX_SAMPLES),
             f"best_of must be an integer in [n, {MAX_SAMPLES}] (n={self.n!r}), got {self.best_of!r}"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens and (not _is_int(self.max_tokens) or self.min_tokens <= self.max_tokens),
             f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0 and finite (0, or below {GREEDY_BELOW:g}, for greedy), got {self.temperature!r}"),
            ("top_k", _is_int(self.top_k) and self.top_k >= -1, f"top_k must be an integer >= 1, or 0 / -1 to disable it, got {self.top_k!r}"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty!r}"),
            ("presence_penalty", _finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}"),
            ("frequency_penalty", _finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}"),
            ("seed", self.seed is None or (_is_int(self.seed) and -(1 << 63) <= self.seed < 1 << 64), f"seed must be an integer in [-2**63, 2**64), or None, got {self.seed!r}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"[:300]),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters each"),
            ("stop_token_ids", all(_is_int(t) for t in self.stop_token_ids), f"stop_token_ids must be integers, got {self.stop_token_ids!r}"[:300]),
            ("bad_words_ids", all(w and all(_is_int(t) for t in w) for w in self.bad_words_ids), f"bad_words_ids must be non-empty lists of token ids, got {self.bad_words_ids!r}"[:300]),
            ("logit_bias", all(_is_int(t) and t >= 0 and _finite(b) and abs(b) <= LOGIT_BIAS_RANGE for t, b in self.logit_bias.items()),
             f"logit_bias must map token ids (integers >= 0) to numbers in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"),
            ("guided_decoding", self.guided_decoding is None or isinstance(self.guided_decoding, GuidedDecodingParams),
             f"guided_decoding must be a GuidedDecodingParams, got {type(self.guided_decoding).__name__}"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"),
            ("prompt_logprobs", self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParam(param, message)

    @property
    def num_samples(self) -> int:
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
