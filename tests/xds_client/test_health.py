"""The workload's health as Istio's agent reports it: thresholds of consecutive results, a report
only when the state changes (the first always), and the request's two forms."""

from __future__ import annotations

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from pilotfish.xds_client.health import HEALTH_TYPE, Health, HealthTracker


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
