"""Envoy's readiness and active connections from its stats (agent/envoy/readiness.py), in
Istio's words."""

from __future__ import annotations

from pilotfish.agent.envoy.readiness import active_connections, parse_stats, readiness

LIVE = {"server.state": 0, "listener_manager.workers_started": 1}


def test_config_first_then_live_then_workers() -> None:
    state = readiness({"server.state": 2, "cluster_manager.cds.update_rejected": 1}, False)
    assert state.reason == ("config not received from XDS server (is Istiod running?): cds updates: 0 successful, "
                            "1 rejected; lds updates: 0 successful, 0 rejected") and not state.config_received
    got = {"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_success": 1}
    state = readiness({**got, "server.state": 2, "listener_manager.workers_started": 0}, False)
    assert state.reason == "server is not live, current state is: PRE_INITIALIZING" and state.config_received
    assert readiness({**got, "server.state": 0, "listener_manager.workers_started": 0}, False).reason == \
        "workers have not yet started"
    assert readiness({**got, **LIVE}, False).reason is None


def test_config_partly_received_or_rejected_in_istios_words() -> None:
    counts = "cds updates: 1 successful, 0 rejected; lds updates: 0 successful, {} rejected"
    assert readiness({"cluster_manager.cds.update_success": 1, **LIVE}, False).reason == \
        "config not fully received from XDS server: " + counts.format(0)
    state = readiness({"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_rejected": 2}, False)
    assert state.reason == "config received from XDS server, but was rejected: " + counts.format(2)
    assert not state.config_received


def test_missing_or_unknown_server_stats() -> None:
    """`usedonly` leaves out a stat Envoy has not set yet: Istio's probe says which."""
    got = {"cluster_manager.cds.update_success": 1, "listener_manager.lds.update_success": 1}
    assert readiness({**got, "listener_manager.workers_started": 1}, False).reason == \
        "failed to get readiness stats: server.state is not yet updated"
    assert readiness({**got, "server.state": 0}, False).reason == \
        "failed to get readiness stats: listener_manager.workers_started is not yet updated"
    assert readiness({**LIVE, "server.state": 7}, True).reason == "server is not live, current state is: UNKNOWN"


def test_config_once_received_is_remembered() -> None:
    """A control plane that goes away later must not make the pod unready (Istio's probe)."""
    assert readiness(LIVE, True).reason is None
    assert readiness({"server.state": 1, "listener_manager.workers_started": 1}, True).reason == \
        "server is not live, current state is: DRAINING"


def test_active_connections_count_the_workloads_listeners_only() -> None:
    stats = parse_stats(
        "http.inbound_0.0.0.0_80.downstream_cx_active: 5\n"
        "listener.0.0.0.0_15006.downstream_cx_active: 2\n"
        "listener.0.0.0.0_15006.worker_0.downstream_cx_active: 2\n"
        "listener.0.0.0.0_15001.downstream_cx_active: 1\n"
        "listener.0.0.0.0_15021.downstream_cx_active: 1\n"
        "listener.admin.downstream_cx_active: 1\n"
        "listener.envoy_internal_main.downstream_cx_active: 4\n"
        "not a stat line\n")
    known = {"listener.0.0.0.0_15021.downstream_cx_active", "listener.admin.downstream_cx_active"}
    assert active_connections(stats, known) == 3
    assert active_connections({}, known) is None
