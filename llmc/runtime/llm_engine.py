"""`LLMEngine`: the synchronous core of the runtime. Requests go in; each `step()` advances all of them.

`LLM` (batch generation) and the server's async engine are thin drivers of this loop.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections import deque
from pathlib import Path

import torch

from llmc.engine import EngineConfig, load_tokenizer, verify_files
from llmc.runtime.block_manager import BlockManager
from llmc.runtime.executor import LocalExecutor, MultiprocExecutor, TorchrunExecutor, exit_if_importing_main
from llmc.runtime.step_inputs import prepare_step
from llmc.runtime.outputs import RequestOutput, RequestState, SampleState
from llmc.runtime.sampler import before_min_tokens, prompt_logprobs, sample_tokens, token_logprobs
from llmc.runtime.sampling_params import InvalidParam, SamplingParams
from llmc.runtime.scheduler import Scheduler
from llmc.runtime.structured_output import StructuredOutput
from llmc.runtime.worker import torchrun_rank
from llmc.runtime.sequence import Sequence, Status

DEFAULT_KV_CACHE_BYTES = 1 << 30
log = logging.getLogger("llmc")


class LLMEngine:
    """An engine directory, loaded: tokenizer, ranks (each with its program and KV cache), schedulers.

    The paged KV cache holds `kv_cache_tokens` tokens, or as many as fit in `kv_cache_memory` GiB
    (per rank); by default room for max_num_seqs full-length requests within 1 GiB, and never less
    than one. An engine of several ranks runs one process per rank; a rank that dies, or returns
    nothing for `rank_timeout` seconds, stops them all with an error.

    With pipeline parallelism, requests are spread over pp schedulers (vLLM's virtual engines) that
    share the KV blocks; each keeps one step in flight, so every stage works on some step at once.

    `max_model_len` caps a request's tokens (prompt and output) below the engine's max_seq_len.
    """

    def __init__(
        self,
        engine: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        kv_cache_tokens: int | None = None,
        kv_cache_memory: float | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        rank_timeout: float = 60.0,
    ):
        exit_if_importing_main()
        if kv_cache_tokens is not None and kv_cache_memory is not None:
            raise ValueError("give the KV cache size as kv_cache_tokens or as kv_cache_memory, not both")
        self.engine_dir = Path(engine)
        self.config = config = EngineConfig.load(self.engine_dir)
        verify_files(self.engine_dir, config)
        self.tokenizer = load_tokenizer(self.engine_dir, config)
        self.device = torch.device(device)

        limits = config.limits
        self.max_seq_len = limits["max_seq_len"]
        if max_model_len is not None:
            if not 2 <= max_model_len <= self.max_seq_len:
                raise ValueError(
                    f"max_model_len must be in [2, {self.max_seq_len}] (the engine's max_seq_len), got {max_model_len}; "
                    "rebuild the engine with a larger --max-seq-len for longer requests"
                )
            self.max_seq_len = max_model_len
        self.block_size = block_size = config.kv_cache["block_size"]
        itemsize = getattr(torch, config.kv_cache["dtype"]).itemsize
        bytes_per_token = max(
            2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"] * itemsize for kv in (r["kv_cache"] for r in config.ranks)
        )
        max_num_seqs = max_num_seqs or limits["max_num_seqs"]
        if kv_cache_memory is not None:
            kv_cache_tokens = int(kv_cache_memory * (1 << 30)) // bytes_per_token
        if kv_cache_tokens is None:
            kv_cache_tokens = min(max_num_seqs * self.max_seq_len, DEFAULT_KV_CACHE_BYTES // bytes_per_token)
            kv_cache_tokens = max(kv_cache_tokens, self.max_seq_len)
        if kv_cache_tokens < self.max_seq_len:
            raise ValueError(
                f"a KV cache of {kv_cache_tokens} tokens ({kv_cache_tokens * bytes_per_token / (1 << 30):.3g} GiB) cannot hold "
                f"one request of max_seq_len={self.max_seq_len} ({self.max_seq_len * bytes_per_token / (1 << 30):.3g} GiB); "
                "give it more memory, or build the engine with a smaller --max-seq-len"
            )
        num_blocks = -(-kv_cache_tokens // block_size)
        _check_fits_in_memory(num_blocks * block_size * bytes_per_token, config.world_size, self.device)
        self.kv_cache_tokens = num_blocks * block_size
        if config.world_size == 1:
            self.executor = LocalExecutor(self.engine_dir, config, num_blocks, self.device)
        else:
            if self.device.type != "cpu":
                raise ValueError(f"{engine} has {config.world_size} ranks; this runtime runs them on CPU (gloo)")
            started_by_torchrun = torchrun_rank() is not None
            executor = TorchrunExecutor if started_by_torchrun else MultiprocExecutor
            self.executor = executor(self.engine_dir, config, num_blocks, rank_timeout)
        rope = config.rope or {}
        # Keys rotated by length-dependent RoPE depend on the sequence's length, not only on the tokens before them.
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching and not rope)
        self.schedulers: list[Scheduler] = []
        for _ in range(config.mapping["pp"]):  # peers: they share the max_num_seqs cap
            self.schedulers.append(Scheduler(self.block_manager, limits["max_batch_tokens"], max_num_seqs, peers=self.schedulers,
                                             recompute_above=rope.get("recompute_above")))
        self.in_flight: deque[tuple[Scheduler, list, list]] = deque()  # (scheduler, batch, sampled) in submission order
        self.eos_token_ids = set(config.eos_token_ids)
        self.requests: dict[str, RequestState] = {}  # in flight, by request id
        self.scheduler_of: dict[str, Scheduler] = {}
        self.held: dict[str, list[Sequence]] = {}  # samples after a request's first, until its prompt is in the cache
        self._structured_output: StructuredOutput | None = None
        self._structured_output_lock = threading.Lock()

    @property
    def structured_output(self) -> StructuredOutput:
        """Built at the first guided request (the server's threads may ask at once): the tokenizer's vocabulary
        is read for the grammar compiler once."""
        with self._structured_output_lock:
            if self._structured_output is None:
                self._structured_output = StructuredOutput(self.tokenizer, self.config.vocab_size, sorted(self.eos_token_ids))
            return self._structured_output

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string is at least as long as its text)."""
        return max(map(len, self.tokenizer.get_vocab()))

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Prompt text or token ids -> checked token ids (raises ValueError naming the problem).

        A text too long to fit in max_seq_len tokens of max_token_chars characters each is refused
        before the tokenizer sees it, so that a huge prompt costs nothing.
        """
        if isinstance(prompt, str):
            try:
                prompt.encode()
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt is not valid Unicode: {e.reason} at character {e.start} ({prompt[e.start:e.end]!r}); send UTF-8 text") from None
            most = (self.max_seq_len - 1) * self.max_token_chars
            if len(prompt) > most:
                raise ValueError(
                    f"prompt has {len(prompt)} characters, more than the engine's {self.max_seq_len} tokens per request can hold "
                    f"(at most {most} characters); shorten the prompt or rebuild with a larger --max-seq-len"
                )
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but the engine holds at most {self.max_seq_len} tokens per request "
                f"(prompt plus at least one generated token); shorten the prompt or rebuild with a larger --max-seq-len"
            )
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone (raises InvalidParam): token ids within this engine's vocabulary, and
        that the guided decoding's grammar compiles (compiling it now: requests with the same grammar then find it cached)."""
        vocab = self.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidParam("logit_bias", f"logit_bias has token ids outside the vocabulary [0, {vocab})")
        if params.guided_decoding is not None:
            self.structured_output.compile(params.guided_decoding)

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, prompt: str | None = None
    ) -> str:
        """Queue a request (token ids from `tokenize`); returns its id.

        A request of several samples (n, best_of) computes its prompt once: the first sample is scheduled
        alone; the others follow once its prompt's K/V are in the cache, and share its full blocks."""
        self.check_params(params)
        first = Sequence(prompt_token_ids, params, request_id)
        if first.request_id in self.requests:
            raise ValueError(f"request id {first.request_id!r} is already in flight")
        seqs = [first] + [Sequence(prompt_token_ids, params, first.request_id, i) for i in range(1, params.num_samples)]
        if params.min_tokens:
            ban = torch.tensor(sorted(self.eos_token_ids | set(params.stop_token_ids)), dtype=torch.long)
            for seq in seqs:
                seq.min_tokens_ban = ban
        if params.guided_decoding is not None:  # each sample follows the grammar on its own
            for seq in seqs:
                seq.grammar = self.structured_output.matcher(params.guided_decoding)
        self.requests[first.request_id] = RequestState(seqs, self.tokenizer, prompt)
        scheduler = min(self.schedulers, key=lambda s: len(s.waiting) + len(s.running))
        self.scheduler_of[first.request_id] = scheduler
        scheduler.add(first)
        if len(seqs) > 1:
            self.held[first.request_id] = seqs[1:]
        return first.request_id

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            scheduler = self.scheduler_of.pop(request_id)
            for seq in self.held.pop(request_id, []):
                seq.status, seq.finish_reason = Status.FINISHED, "abort"
            for seq in state.seqs:
                if not seq.is_finished:
                    scheduler.abort(seq)
                seq.grammar = None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """One in-flight batching step; returns an output for every request that got a new token (or prompt logprobs).

        Every scheduler without a step in flight submits one; then the oldest step's logits are sampled.
        """
        busy = [s for s, _, _, _ in self.in_flight]
        for scheduler in self.schedulers:
            if scheduler not in busy and scheduler.has_unfinished():
                batch = scheduler.schedule()
                if batch:
                    inputs, sampled, scored = prepare_step(batch, self.block_size)
                    self.executor.submit(inputs)
                    self.in_flight.append((scheduler, batch, sampled, scored))
        if not self.in_flight:
            raise RuntimeError("the scheduler could not make progress (KV cache too small for any request)")
        scheduler, batch, sampled, scored = self.in_flight.popleft()
        logits = self.executor.result()
        for seq, n in batch:
            seq.num_computed_tokens += n
        # Each request's prompt scoring, sampling, detokenization and stop matching: one that fails ends alone, with its error.
        touched: dict[str, RequestState] = {}
        failed: dict[str, str] = {}
        row = len(sampled)
        for seq, lo, hi in scored:
            rows, row = logits[row : row + hi - lo].float(), row + hi - lo
            if self._live(seq):
                try:
                    seq.prompt_logprobs += prompt_logprobs(rows, seq.token_ids[lo + 1 : hi + 1], seq.params.prompt_logprobs)
                except Exception as e:
                    log.exception("request %s failed; ending it alone", seq.request_id)
                    touched[seq.request_id] = self.requests[seq.request_id]
                    failed[seq.request_id] = f"{type(e).__name__}: {e}"
        live = [i for i, seq in enumerate(sampled) if self._live(seq) and seq.request_id not in failed]
        rows = logits[: len(sampled)][live].float().contiguous()  # contiguous: grammars mask it in place
        seqs = [sampled[i] for i in live]
        raw_rows = self._mask_by_grammars(rows, seqs)
        try:  # the whole batch at once (llmc/runtime/sampler.py)
            tokens = sample_tokens(rows, seqs)
        except Exception:  # one request's data broke it: sample each row alone below, so that only that one fails
            log.exception("sampling the batch failed; sampling each request alone")
            tokens = None
        for i, (seq, row) in enumerate(zip(seqs, rows)):
            state = touched[seq.request_id] = self.requests[seq.request_id]
            if seq.request_id in failed:  # an earlier sample of the request failed this step
                continue
            try:
                if seq.index == 0 and seq.num_computed_tokens == seq.num_prompt_tokens:
                    self._release_held(seq, scheduler)
                if seq.params.max_tokens == 0:  # the prompt is scored: nothing to generate
                    self._finish(scheduler, seq, "length")
                    continue
                raw_row = raw_rows.get(i)
                token = tokens[i] if tokens else sample_tokens(row[None], [seq])[0]
                model_row = row if raw_row is None else raw_row
                logprobs = token_logprobs(model_row, token, seq)
                if seq.grammar is not None:
                    self._advance_grammar(seq, token)
                seq.token_ids.append(token)
                sample = state.samples[seq.index]
                logprob = None
                if sample.cumulative_logprob is not None:
                    logprob = logprobs[token] if logprobs else model_row.log_softmax(-1)[token].item()
                sample.append(token, logprobs, logprob)
                reason = self._finish_reason(seq, token, sample)
                if reason:
                    self._finish(scheduler, seq, reason)
            except Exception as e:
                log.exception("request %s failed; ending it alone", seq.request_id)
                failed[seq.request_id] = f"{type(e).__name__}: {e}"
        outputs = []
        for request_id, state in touched.items():
            if request_id in failed:
                self.abort_request(request_id)
                outputs.append(state.output(error=failed[request_id]))
            else:
                if state.finished:
                    del self.requests[request_id], self.scheduler_of[request_id]
                outputs.append(state.output())
        return outputs

    def _mask_by_grammars(self, rows: torch.Tensor, seqs: list[Sequence]) -> dict[int, torch.Tensor]:
        """Mask, in place, the rows of guided samples to the tokens their grammars allow next. Returns the rows, as the
        model gave them, of those whose logprobs are kept (logprobs are the model's, as vLLM's), by row index."""
        grammars = [seq.grammar for seq in seqs]
        if all(g is None for g in grammars):
            return {}
        p = [seq.params for seq in seqs]  # logprobs kept: asked for, or summed to rank best_of's samples
        raw_rows = {i: rows[i].clone() for i, seq in enumerate(seqs) if seq.grammar is not None and (p[i].logprobs is not None or p[i].num_samples > p[i].n)}
        self.structured_output.mask_(rows, grammars)
        return raw_rows

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> None:
        """Feed the sampled token to the sample's grammar. Before min_tokens, a banned token (EOS, a stop token) or one
        the grammar refuses is taken only where the ban and the grammar together leave nothing: an error, not a stop."""
        short = before_min_tokens(seq)
        if short and token in seq.min_tokens_ban.tolist() or not seq.grammar.accept_token(token):
            if short:
                raise RuntimeError(f"min_tokens={seq.params.min_tokens} cannot be met: after {len(seq.output_token_ids)} tokens "
                                   "the grammar allows nothing but EOS or stop tokens")
            raise RuntimeError(f"token {token} does not follow the request's grammar")

    def _live(self, seq: Sequence) -> bool:
        """Not aborted (nor finished) since its step was scheduled."""
        return seq.request_id in self.requests and not seq.is_finished

    def _release_held(self, first: Sequence, scheduler: Scheduler) -> None:
        """The request's first sample has computed its prompt: its other samples can share it now."""
        for seq in self.held.pop(first.request_id, []):
            if first.params.max_tokens == 0:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
            else:
                scheduler.add(seq)

    def shutdown(self) -> None:
        """Stop the engine's rank processes (if any); the engine cannot step afterwards."""
        self.executor.shutdown()

    def _finish(self, scheduler: Scheduler, seq: Sequence, reason: str) -> None:
        scheduler.finish(seq, reason)
        seq.grammar = None

    def _finish_reason(self, seq: Sequence, token: int, sample: SampleState) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            sample.stop_reason = token if token in p.stop_token_ids else None
            return "stop"
        if sample.detokenizer.stopped:
            sample.stop_reason = sample.detokenizer.stop_string
            return "stop"
        if seq.grammar is not None and seq.grammar.is_terminated():  # it took a stop token: the structure is complete
            return "stop"
        if len(seq.output_token_ids) >= seq.params.max_tokens or len(seq) >= self.max_seq_len:
            return "length"
        return None


def _check_fits_in_memory(bytes_per_rank: int, world_size: int, device: torch.device) -> None:
    """A KV cache larger than the memory it would live in is an error now, not an allocation failure later."""
    if device.type == "cuda":
        available, what = torch.cuda.mem_get_info(device)[1], f"{device}'s"
        needed = bytes_per_rank
    else:
        available, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine's"
        needed = bytes_per_rank * (1 if torchrun_rank() is not None else world_size)  # ranks started here share its memory
    if needed > available:
        raise ValueError(
            f"a KV cache of {needed / (1 << 30):.4g} GiB does not fit in {what} {available / (1 << 30):.4g} GiB of memory; "
            "give a smaller --kv-cache-memory or --kv-cache-tokens"
        )
