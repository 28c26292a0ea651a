"""The workload's health as the agent tells the control plane (VMs: WorkloadEntry health), without
I/O: probe results in, a change of state out, and the request that reports it; and the loop
that probes (the probe itself is the agent's: an HTTP, TCP, gRPC or exec check of the app).

As Istio's agent (docs/istio-compat.md "Workload health over xDS"), only when a readiness probe
is configured: consecutive results are counted, and the state is reported only when it changes
(the first state always): healthy after `success_threshold` successes in a row, unhealthy after
`failure_threshold` failures in a row. The report is a request of type HealthInformation on the
ADS stream, healthy with nothing else, unhealthy with `error_detail` (INTERNAL, the probe's
reason). The xDS proxy sends the latest on every upstream stream once Envoy asked for listeners.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from google.rpc.status_pb2 import Status

from .core import INTERNAL, Request

HEALTH_TYPE = "type.googleapis.com/istio.v1.HealthInformation"


@dataclass(frozen=True)
class Health:
    """A state to report: healthy, or not and why."""

    healthy: bool
    reason: str = ""

    def request(self, delta: bool) -> Request:
        """The report on a stream of the protocol `delta` says."""
        error = None if self.healthy else Status(code=INTERNAL, message=self.reason)
        if delta:
            return DeltaDiscoveryRequest(type_url=HEALTH_TYPE, error_detail=error)
        return DiscoveryRequest(type_url=HEALTH_TYPE, error_detail=error)


class HealthTracker:
    """Probe results in, the state to report out when it changes."""

    def __init__(self, success_threshold: int = 1, failure_threshold: int = 1) -> None:
        self.success_threshold = max(success_threshold, 1)
        self.failure_threshold = max(failure_threshold, 1)
        self._successes = 0
        self._failures = 0
        self._reported: bool | None = None  # the state reported last, None before the first

    def observe(self, healthy: bool, reason: str = "") -> Health | None:
        """One probe's result; the state to report, or None when it stays as reported."""
        if healthy:
            self._successes, self._failures = self._successes + 1, 0
            if self._successes >= self.success_threshold and self._reported is not True:
                self._successes, self._reported = 0, True
                return Health(True)
        else:
            self._failures, self._successes = self._failures + 1, 0
            if self._failures >= self.failure_threshold and self._reported is not False:
                self._failures, self._reported = 0, False
                return Health(False, reason)
        return None


async def watch_health(probe: Callable[[], Awaitable[str | None]], tracker: HealthTracker,
                       report: Callable[[Health], None], period: float = 10.0, initial_delay: float = 0.0) -> None:
    """Forever (until cancelled): after `initial_delay`, run `probe` (None when healthy, else
    why not) at once and then every `period` seconds, and `report` each change (XdsProxy.report_health)."""
    await trio.sleep(initial_delay)
    while True:
        reason = await probe()
        health = tracker.observe(reason is None, reason or "")
        if health is not None:
            report(health)
        await trio.sleep(period)
