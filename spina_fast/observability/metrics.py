"""Prometheus metrics of one agent: process/runtime collectors plus Spina's own."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Lookups are meant to take well under a millisecond, so the buckets start at 50 µs.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BUCKET_LABELS = [floatToGoString(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]

# What a counting source reports: (method, route, status, requests, per-bucket counts over LATENCY_BUCKETS
# (not cumulative, +Inf last), seconds in total).
SourceSample = tuple[str, str, int, int, list[int], float]


class HTTPRequestMetrics(Collector):
    """``spina_http_requests_total{method,route,status}`` and ``spina_http_request_duration_seconds{method,route}``.

    Counted in plain ints and lists on the event loop and turned into metric families only when scraped:
    prometheus_client's Counter and Histogram take a lock and validate on every call, which together
    cost about as much as answering a KV read on the fast path. The exposition is the same.

    Code that counts its requests itself (the fast front end's lane for repeated reads counts in C) is added with
    ``add_source``: its totals are read and merged in at every scrape."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        # (method, route) -> per-bucket counts (not cumulative; the last one is +Inf), then the sum of seconds.
        self._latencies: dict[tuple[str, str], list[float]] = {}
        self._sources: list[Callable[[], Iterable[SourceSample]]] = []

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        latency = self._latencies.get((method, route))
        if latency is None:
            latency = self._latencies[method, route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # Prometheus buckets are "<= le"
        latency[-1] += seconds

    def add_source(self, source: Callable[[], Iterable[SourceSample]]) -> None:
        """Merge what ``source()`` reports (running totals, not increments) into every scrape."""
        self._sources.append(source)

    def describe(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        yield from self._families({}, {})

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        counts = dict(self._counts)
        latencies = {key: list(value) for key, value in self._latencies.items()}
        width = len(LATENCY_BUCKETS) + 1
        for source in self._sources:
            for method, route, status, requests, buckets, seconds in source():
                if len(buckets) != width:
                    raise ValueError(f"a metrics source reported {len(buckets)} latency buckets, not {width}")
                key = (method, route, status)
                counts[key] = counts.get(key, 0) + requests
                latency = latencies.setdefault((method, route), [0.0] * (width + 1))
                for position, count in enumerate(buckets):
                    latency[position] += count
                latency[-1] += seconds
        yield from self._families(counts, latencies)

    @staticmethod
    def _families(counts: dict[tuple[str, str, int], int], latencies: dict[tuple[str, str], list[float]],
                  ) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("spina_http_requests", "HTTP requests served, by route and status.",
                                       labels=["method", "route", "status"])
        for (method, route, status), count in counts.items():
            requests.add_metric([method, route, str(status)], count)
        yield requests
        durations = HistogramMetricFamily("spina_http_request_duration_seconds",
                                          "Time from request parsed to response written.", labels=["method", "route"])
        for (method, route), latency in latencies.items():
            cumulative = accumulate(latency[:-1])
            durations.add_metric([method, route], list(zip(_BUCKET_LABELS, cumulative, strict=True)),
                                 sum_value=latency[-1])
        yield durations


class AgentMetrics:
    """A registry per agent (not the global one), so several agents can live in one test process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.http = HTTPRequestMetrics()
        self.registry.register(self.http)
        self.observe_http = self.http.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
