"""Metrics of the control-plane connection and of the xDS proxy, read from their state at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .outcome import CANCELLED, ERROR
from .proxy import ProxyCounters
from .transport import ConnectionState


class XdsMetrics:
    """prometheus-client collector over a ConnectionState."""

    def __init__(self, state: Callable[[], ConnectionState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state: ConnectionState = self._state()
        yield GaugeMetricFamily("pilotfish_xds_connected", "1 while the ADS stream to the control plane is up.",
                                value=1 if state.connected else 0)
        yield CounterMetricFamily("istio_agent_istiod_connection_failures",
                                  "The total number of connection failures to Istiod", value=state.failures)
        terminations = CounterMetricFamily("istio_agent_istiod_connection_terminations",
                                           "The total number of connection errors to Istiod", labels=["type"])
        for kind in (CANCELLED, ERROR):
            terminations.add_metric([kind], state.terminations[kind])
        yield terminations
        yield GaugeMetricFamily("pilotfish_xds_last_update_timestamp_seconds",
                                "When the last resource was accepted (Unix time; 0 before the first).",
                                value=state.last_update)
        accepted = CounterMetricFamily("pilotfish_xds_accepted", "Resources accepted (ACKed), by type.",
                                       labels=["type_url"])
        rejected = CounterMetricFamily("pilotfish_xds_rejected", "Resources rejected (NACKed), by type.",
                                       labels=["type_url"])
        for type_url, type_state in state.types.items():
            accepted.add_metric([type_url], type_state.accepted)
            rejected.add_metric([type_url], type_state.rejected)
        yield accepted
        yield rejected


class ProxyMetrics:
    """prometheus-client collector over the xDS proxy's counters, with Istio's names where Istio
    has the metric (docs/istio-compat.md "Agent metrics"). The upstream side (connection
    failures, terminations, accepted and rejected) is XdsMetrics over the proxy's state."""

    def __init__(self, counters: Callable[[], ProxyCounters]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters: ProxyCounters = self._counters()
        yield GaugeMetricFamily("pilotfish_xds_proxy_streams", "Envoy's ADS streams open through the xDS proxy.",
                                value=counters.streams)
        yield CounterMetricFamily("istio_agent_xds_proxy_requests", "The total number of Xds Proxy Requests",
                                  value=counters.requests)
        yield CounterMetricFamily("istio_agent_xds_proxy_responses", "The total number of Xds Proxy Responses",
                                  value=counters.responses)
        terminations = CounterMetricFamily("istio_agent_envoy_connection_terminations",
                                           "The total number of connection errors from envoy", labels=["type"])
        for kind in (CANCELLED, ERROR):
            terminations.add_metric([kind], counters.envoy_terminations[kind])
        yield terminations
