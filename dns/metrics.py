"""DNS metrics: Istio's four under Istio's names, plus pilotfish's cache and local-answer counts.

Counters on the serving path are plain ints in per-thread objects (one writer each, no lock, no
prometheus-client call per query); a collector sums them when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .cache import UpstreamCache

UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1, 5)  # Istio's buckets


class ThreadStats:
    """Counters written by exactly one thread."""

    __slots__ = ("memo_hits", "requests", "local")

    def __init__(self) -> None:
        self.memo_hits = 0  # answered from the reply memo: local answers
        self.requests = 0  # reached the handler by the slow path
        self.local = 0  # of those, answered from the table


class DnsMetrics:
    """The proxy's metrics, registered in `registry` (one per proxy, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry, cache: UpstreamCache | None) -> None:
        self._threads: list[ThreadStats] = []
        self._cache = cache
        self.upstream_requests = 0  # written by the trio thread only
        self.upstream_failures = 0
        self.upstream_duration = Histogram(
            "istio_agent_dns_upstream_request_duration_seconds",
            "Total time in seconds to forward a query upstream, all retries included.",
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        registry.register(self)

    def thread_stats(self) -> ThreadStats:
        """Counters for the calling thread to own."""
        stats = ThreadStats()
        self._threads.append(stats)
        return stats

    @property
    def requests(self) -> int:
        return sum(t.memo_hits + t.requests for t in self._threads)

    @property
    def local_answers(self) -> int:
        return sum(t.memo_hits + t.local for t in self._threads)

    def collect(self) -> Iterator[Metric]:
        """prometheus-client collector protocol."""
        yield CounterMetricFamily(
            "istio_agent_dns_requests", "Total number of DNS requests.", value=self.requests
        )
        yield CounterMetricFamily(
            "istio_agent_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream.",
            value=self.upstream_requests,
        )
        yield CounterMetricFamily(
            "istio_agent_dns_upstream_failures",
            "Total number of DNS failures forwarding upstream.",
            value=self.upstream_failures,
        )
        yield CounterMetricFamily(
            "pilotfish_dns_local_answers",
            "DNS queries answered from the mesh name table.",
            value=self.local_answers,
        )
        cache = self._cache
        yield CounterMetricFamily(
            "pilotfish_dns_cache_hits", "Upstream cache hits.", value=cache.hits if cache is not None else 0
        )
        yield CounterMetricFamily(
            "pilotfish_dns_cache_misses", "Upstream cache misses.", value=cache.misses if cache is not None else 0
        )
        yield CounterMetricFamily(
            "pilotfish_dns_cache_stale_answers",
            "Answers served stale from the cache because no upstream answered (RFC 8767).",
            value=cache.stale_hits if cache is not None else 0,
        )
        yield GaugeMetricFamily(
            "pilotfish_dns_cache_entries", "Entries in the upstream cache.", value=len(cache) if cache is not None else 0
        )
