"""DNS metrics: Istio's four under Istio's names, plus pilotfish's cache and local-answer counts.

Counters on the serving path are plain ints in per-thread objects (one writer each, no lock, no
prometheus-client call per query); a collector sums them when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .cache import UpstreamCache

UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.1, 1, 5)  # Istio's buckets


class ThreadStats:
    """Counters written by exactly one thread."""

    __slots__ = ("cache_hits", "local", "memo_hits", "requests")

    def __init__(self) -> None:
        self.memo_hits = 0  # answered from the reply memo: local answers
        self.cache_hits = 0  # answered from the reply memo: forwarded answers still fresh
        self.requests = 0  # reached the handler by the slow path
        self.local = 0  # of those, answered from the table


class DnsMetrics:
    """The proxy's metrics, registered in `registry` (one per proxy, so tests can run several)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        cache: UpstreamCache | None,
        memo_usage: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self._threads: list[ThreadStats] = []
        self._cache = cache
        self._memo_usage = memo_usage
        self.upstream_requests = 0  # written by the trio thread only (TCP clients' forwards)
        self.upstream_failures = 0
        self.forward_rejected = 0
        self.udp_upstream_requests = 0  # written under the UDP forwarder's lock
        self.udp_upstream_failures = 0
        self.udp_forward_rejected = 0
        self.tcp_evicted = 0
        self.tcp_send_timeouts = 0
        self.resource_exhausted = 0
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
        return sum(t.memo_hits + t.cache_hits + t.requests for t in self._threads)

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
            value=self.upstream_requests + self.udp_upstream_requests,
        )
        yield CounterMetricFamily(
            "istio_agent_dns_upstream_failures",
            "Total number of DNS failures forwarding upstream.",
            value=self.upstream_failures + self.udp_upstream_failures,
        )
        yield CounterMetricFamily(
            "pilotfish_dns_local_answers",
            "DNS queries answered from the mesh name table.",
            value=self.local_answers,
        )
        cache = self._cache
        memo_cache_hits = sum(t.cache_hits for t in self._threads)
        yield CounterMetricFamily(
            "pilotfish_dns_cache_hits", "Upstream cache hits (from the reply memo or the cache).",
            value=memo_cache_hits + (cache.hits if cache is not None else 0),
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
        yield GaugeMetricFamily(
            "pilotfish_dns_cache_bytes", "Bytes the upstream cache counts against --cache-max-bytes.",
            value=cache.nbytes if cache is not None else 0,
        )
        yield CounterMetricFamily(
            "pilotfish_dns_cache_evictions", "Cache entries dropped to stay within the bounds.",
            value=cache.evictions if cache is not None else 0,
        )
        entries, nbytes = self._memo_usage()
        yield GaugeMetricFamily("pilotfish_dns_memo_entries", "Finished replies in the reply memos.", value=entries)
        yield GaugeMetricFamily("pilotfish_dns_memo_bytes", "Bytes the reply memos count.", value=nbytes)
        for name, doc, value in (
            ("pilotfish_dns_forward_rejected",
             "Queries answered SERVFAIL because the bound of forwards in flight was reached.",
             self.forward_rejected + self.udp_forward_rejected),
            ("pilotfish_dns_tcp_evicted",
             "TCP connections closed to make room for a new one at the connection bound.",
             self.tcp_evicted),
            ("pilotfish_dns_tcp_send_timeouts",
             "TCP connections closed because a reply could not be sent in time.",
             self.tcp_send_timeouts),
            ("pilotfish_dns_resource_exhausted",
             "accept() or socket() failures for want of descriptors or buffers.",
             self.resource_exhausted),
        ):
            yield CounterMetricFamily(name, doc, value=value)
