"""The workload's health as Istio's agent reports it: thresholds of consecutive results, a report
only when the state changes (the first always), and the request's two forms."""

from __future__ import annotations

import trio
import trio.testing
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from pilotfish.xds_client.health import HEALTH_TYPE, Health, HealthTracker, watch_health


def test_the_first_state_is_reported_then_only_changes() -> None:
    tracker = HealthTracker()
    assert tracker.observe(True) == Health(True)
    assert tracker.observe(True) is None
    assert tracker.observe(False, "refused") == Health(False, "refused")
    assert tracker.observe(False, "refused again") is None
    assert tracker.observe(True) == Health(True)


def test_thresholds_count_results_in_a_row() -> None:
    tracker = HealthTracker(success_threshold=2, failure_threshold=3)
    assert tracker.observe(False, "a") is None
    assert tracker.observe(False, "b") is None
    assert tracker.observe(True) is None  # resets the failures
    assert [tracker.observe(False, r) for r in "cde"] == [None, None, Health(False, "e")]
    assert tracker.observe(True) is None
    assert tracker.observe(True) == Health(True)


def test_the_report_in_both_protocols() -> None:
    assert Health(True).request(delta=False) == DiscoveryRequest(type_url=HEALTH_TYPE)
    unhealthy = Health(False, "HTTP 503").request(delta=True)
    assert isinstance(unhealthy, DeltaDiscoveryRequest) and unhealthy.type_url == HEALTH_TYPE
    assert (unhealthy.error_detail.code, unhealthy.error_detail.message) == (13, "HTTP 503")


def test_the_loop_probes_every_period_and_reports_changes() -> None:
    results = iter([None, None, "HTTP 503", "HTTP 503", None])
    reports: list[tuple[float, Health]] = []

    async def probe() -> str | None:
        return next(results)

    async def main() -> None:
        with trio.move_on_after(40):  # probes at 5, 15, 25 and 35
            await watch_health(probe, HealthTracker(), lambda h: reports.append((trio.current_time(), h)),
                               period=10, initial_delay=5)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert reports == [(5, Health(True)), (25, Health(False, "HTTP 503"))]
