"""Prometheus metrics of one server: its own CollectorRegistry, so that apps never share counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServeMetrics", "CONTENT_TYPE_LATEST", "STAGES"]

# Request stages timed by the rerank path (the X-<Stage>-Time headers carry the same numbers).
STAGES = ("tokenize", "queue", "score", "total")

# 0.5 ms .. 60 s: rejections answer in under a millisecond, CPU reranks of 100 candidates in seconds.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32)


class ServeMetrics:
    """Counters, gauges and histograms of the serving path, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_seconds = Histogram(
            "tailrank_request_stage_seconds",
            "Per-request time spent in each stage (tokenize, queue, score, total)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.search_stage_seconds = Histogram(
            "tailrank_search_stage_seconds",
            "Per-search time in each stage reported by the collection",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "tailrank_batch_size", "Pairs per model batch", buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "tailrank_batch_tokens", "Padded tokens per model batch (rows x padded length)",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "tailrank_batch_requests",
            "Distinct requests whose pairs share one scheduling round (cross-request batching)",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.round_seconds = Histogram(
            "tailrank_round_seconds", "Time of one scheduling round (assembly and model)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_pairs = Gauge("tailrank_queue_pairs", "Pairs admitted and not yet scored", registry=r)
        self.queue_requests = Gauge("tailrank_queue_requests", "Requests admitted and not yet answered", registry=r)
        self.throughput = Gauge(
            "tailrank_throughput_tokens_per_second", "Measured scoring throughput (EWMA of real tokens/s)", registry=r
        )
        self.rejections = Counter(
            "tailrank_rejections_total",
            "Requests refused or dropped, by reason (queue_full, deadline, expired, disconnected, limit, unauthorized)",
            ["reason"],
            registry=r,
        )
        self.cache_admitted = Counter(
            "tailrank_cache_admitted_total",
            "Requests that the full estimate would have refused, admitted on their pairs the score cache "
            "does not hold", registry=r,
        )
        self.degraded = Counter(
            "tailrank_degraded_total", "Responses that ran out of time and ranked only part of the documents",
            registry=r,
        )
        self.batch_failures = Counter(
            "tailrank_batch_failures_total", "Scheduling rounds whose model call raised", registry=r
        )
        self.responses = Counter(
            "tailrank_http_responses_total", "HTTP responses by path and status code", ["path", "code"], registry=r
        )

    def watch_score_cache(self, stats: Callable[[], Any]) -> None:
        """Exposes the score cache's counters (a ``CacheStats`` from ``stats()``), read at each scrape."""
        self.registry.register(_ScoreCacheCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScoreCacheCollector:
    """The score cache keeps its own counters (the library shares them); this reads one snapshot."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        yield CounterMetricFamily("tailrank_score_cache_hits", "Pairs answered from the score cache", value=s.hits)
        yield CounterMetricFamily("tailrank_score_cache_misses", "Pairs looked up and not found (then scored)",
                                  value=s.misses)
        yield CounterMetricFamily("tailrank_score_cache_evictions", "Entries dropped to stay within the size",
                                  value=s.evictions)
        yield GaugeMetricFamily("tailrank_score_cache_entries", "Pairs held by the score cache", value=s.entries)
        yield GaugeMetricFamily("tailrank_score_cache_bytes", "Memory charged to the score cache's entries",
                                value=s.bytes)
        yield GaugeMetricFamily("tailrank_score_cache_capacity_bytes", "Size limit of the score cache",
                                value=s.capacity_bytes)
