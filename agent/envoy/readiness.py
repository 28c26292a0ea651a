"""Envoy's readiness and its active connections, from its admin API's stats text (pure).

Istio's probe (docs/istio-compat.md "Envoy readiness and drain"): Envoy is ready once it has
received its first CDS and LDS (updated successfully at least once; remembered afterwards, as a
control plane that goes away must not make the pod unready), is LIVE, and has started its
workers. The reasons are Istio's words, which users search for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# one request for everything the readiness needs (`usedonly`: stats never touched are absent)
READINESS_STATS = ("/stats?usedonly&filter=^(server\\.state|listener_manager\\.workers_started|"
                   "cluster_manager\\.cds\\.update_(success|rejected)|listener_manager\\.lds\\.update_(success|rejected))$")
ACTIVE_CONNECTIONS_STATS = "/stats?usedonly&filter=downstream_cx_active$"
SERVER_STATES = {0: "LIVE", 1: "DRAINING", 2: "PRE_INITIALIZING", 3: "INITIALIZING"}


def parse_stats(text: str) -> dict[str, int]:
    """`name: value` lines to a map; lines that are not a counter or gauge are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


@dataclass(frozen=True)
class Readiness:
    reason: str | None  # None: ready
    config_received: bool  # CDS and LDS came once: never asked again


def readiness(stats: Mapping[str, int], config_received: bool) -> Readiness:
    cds_ok = stats.get("cluster_manager.cds.update_success", 0)
    lds_ok = stats.get("listener_manager.lds.update_success", 0)
    if not config_received:
        if cds_ok > 0 and lds_ok > 0:
            config_received = True
        else:
            return Readiness(
                "config not received from XDS server (is Istiod running?): "
                f"cds updates: {cds_ok} successful, {stats.get('cluster_manager.cds.update_rejected', 0)} rejected; "
                f"lds updates: {lds_ok} successful, {stats.get('listener_manager.lds.update_rejected', 0)} rejected",
                False)
    state = stats.get("server.state")
    if state != 0:
        name = SERVER_STATES.get(state, str(state)) if state is not None else "unknown"
        return Readiness(f"server is not live, current state is: {name}", config_received)
    if stats.get("listener_manager.workers_started", 0) != 1:
        return Readiness("workers have not yet started", config_received)
    return Readiness(None, config_received)


def active_connections(stats: Mapping[str, int], known: Iterable[str]) -> int | None:
    """Downstream connections still open on the workload's listeners, as Istio counts them:
    listener stats only (HTTP listeners count under `http.` too), not per worker, not Envoy's
    internal listeners, not the agent's own (15021, 15090, admin). None when Envoy has no such
    stat at all (no connection yet, or the stat is not kept)."""
    if not stats:
        return None
    skip = frozenset(known)
    return sum(value for name, value in stats.items()
               if name.startswith("listener.") and "worker_" not in name
               and not name.startswith("listener.envoy_internal_") and name not in skip)
