"""Prometheus metrics of a server: queue, cache and preemption numbers read at scrape time; request
outcomes and latency histograms per request."""

from __future__ import annotations

import time
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from llmc.runtime.async_llm import AsyncLLM
from llmc.runtime.outputs import RequestOutput


class ServerMetrics:
    def __init__(self, llm: AsyncLLM):
        self.llm = llm
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llmc_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("llmc_num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("llmc_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("llmc_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up", registry=r)
        self.requests = Counter("llmc_request_success", "Requests ended, by why: stop, length, abort (the client went away), error",
                                ["finished_reason"], registry=r)
        r.register(_Preemptions(llm))
        self.prompt_tokens = Counter("llmc_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmc_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.tpot = Histogram("llmc_time_per_output_token_seconds", "Time per output token after the first", buckets=buckets, registry=r)

    def render(self) -> bytes:
        engine = self.llm.engine
        blocks = engine.block_manager
        self.running.set(sum(len(s.running) for s in engine.schedulers))
        self.waiting.set(sum(len(s.waiting) for s in engine.schedulers))
        self.kv_usage.set(blocks.usage)
        queries = getattr(blocks, "prefix_cache_queries", 0)
        self.prefix_hit_rate.set(getattr(blocks, "prefix_cache_hits", 0) / queries if queries else 0.0)
        return generate_latest(self.registry)

    async def track(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass outputs through, timing first token and the tokens after it, and count how the request ended."""
        start = last = time.perf_counter()
        count = 0
        ended = None
        try:
            async for out in outputs:
                now = time.perf_counter()
                # (the last output of a best_of request holds only the n it returns: its tokens were counted)
                total = max(count, sum(len(c.token_ids) for c in out.outputs))
                new = total - count
                if last == start:  # the first output
                    self.ttft.observe(now - start)
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                elif new:
                    self.tpot.observe((now - last) / new)
                count, last = total, now
                self.generation_tokens.inc(new)
                if out.finished:
                    ended = out.outputs[0].finish_reason
                    self.requests.labels(ended).inc()
                yield out
        except Exception:  # the engine failed, or the server shut down before the request finished
            ended = "error"
            self.requests.labels(ended).inc()
            raise
        finally:
            if ended is None:  # closed before its end: the client went away
                self.requests.labels("abort").inc()


class _Preemptions(Collector):
    """The schedulers' preemption count, as a counter read at scrape time."""

    def __init__(self, llm: AsyncLLM):
        self.llm = llm

    def collect(self):
        total = sum(s.num_preemptions for s in self.llm.engine.schedulers)
        yield CounterMetricFamily("llmc_num_preemptions", "Requests preempted (KV cache full), to be recomputed", value=total)
