"""What `llmc serve` logs besides access lines: a banner once loaded, and a stats line every few seconds
while busy (prompt and generation throughput, running and waiting requests, KV-cache usage), as vLLM does."""

from __future__ import annotations

import logging
import time

from llmc.runtime.metrics import ServerMetrics

log = logging.getLogger("llmc")


def banner(engine, name: str, engine_dir: str) -> list[str]:
    """The lines that say what is served: model, dtype, mapping, backend, KV capacity, concurrency."""
    config = engine.config
    quant = config.quantization or {}
    tokens = engine.kv_cache_tokens
    return [
        f"serving {name} from {engine_dir}: {config.architecture}, {config.dtype}, tp={config.mapping['tp']} "
        f"pp={config.mapping['pp']}, backend {config.backend}, quantization {quant.get('mode') or 'none'}"
        f"{', KV cache ' + quant['kv_cache_dtype'] if quant.get('kv_cache_dtype') else ''}",
        f"max_model_len {engine.max_seq_len}, max_num_seqs {engine.schedulers[0].max_num_seqs}, "
        f"max_batch_tokens {config.limits['max_batch_tokens']}",
        f"KV cache: {tokens} tokens; maximum concurrency for {engine.max_seq_len} tokens per request: "
        f"{tokens / engine.max_seq_len:.2f}x",
    ]


class StatsLog:
    """`tick()` (called often, on the event loop) logs a stats line every `interval` seconds while there
    is work: requests running or waiting, or tokens processed since the last line."""

    def __init__(self, metrics: ServerMetrics, interval: float = 5.0):
        self.metrics, self.interval = metrics, interval
        self.last_time = time.monotonic()
        self.last_tokens = self._tokens()

    def _tokens(self) -> tuple[float, float]:
        registry = self.metrics.registry
        return (registry.get_sample_value("llmc_prompt_tokens_total") or 0.0,
                registry.get_sample_value("llmc_generation_tokens_total") or 0.0)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_time < self.interval:
            return
        tokens = self._tokens()
        engine = self.metrics.llm.engine
        running = sum(len(s.running) for s in engine.schedulers)
        waiting = sum(len(s.waiting) for s in engine.schedulers)
        if running or waiting or tokens != self.last_tokens:
            seconds = now - self.last_time
            log.info(
                "prompt throughput: %.1f tokens/s, generation throughput: %.1f tokens/s, running: %d reqs, waiting: %d reqs, "
                "KV cache usage: %.1f%%",
                (tokens[0] - self.last_tokens[0]) / seconds, (tokens[1] - self.last_tokens[1]) / seconds, running, waiting,
                100 * engine.block_manager.usage,
            )
        self.last_time, self.last_tokens = now, tokens
