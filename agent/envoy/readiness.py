"""Envoy's readiness and its active connections, from its admin API's stats text (pure).

Istio's probe (docs/istio-compat.md "Envoy readiness and drain"): Envoy is ready once it has
received its first CDS and LDS (updated successfully at least once; remembered afterwards, as a
control plane that goes away must not make the pod unready), is LIVE, and has started its
workers; once ready, it is not asked again (the state and the workers do not go back in an
Envoy's life). The reasons are Istio's words, which users search for.
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
    if not config_received:
        reason = _config_missing(stats)
        if reason is not None:
            return Readiness(reason, False)
    for name in ("server.state", "listener_manager.workers_started"):
        if name not in stats:  # `usedonly`: not set yet this early in Envoy's start
            return Readiness(f"failed to get readiness stats: {name} is not yet updated", True)
    state = stats["server.state"]
    if state != 0:
        return Readiness(f"server is not live, current state is: {SERVER_STATES.get(state, 'UNKNOWN')}", True)
    if stats["listener_manager.workers_started"] != 1:
        return Readiness("workers have not yet started", True)
    return Readiness(None, True)


def _config_missing(stats: Mapping[str, int]) -> str | None:
    """None once CDS and LDS have each been updated, else which of Istio's three words fits."""
    cds_ok = stats.get("cluster_manager.cds.update_success", 0)
    lds_ok = stats.get("listener_manager.lds.update_success", 0)
    if cds_ok > 0 and lds_ok > 0:
        return None
    cds_rejected = stats.get("cluster_manager.cds.update_rejected", 0)
    lds_rejected = stats.get("listener_manager.lds.update_rejected", 0)
    counts = (f"cds updates: {cds_ok} successful, {cds_rejected} rejected; "
              f"lds updates: {lds_ok} successful, {lds_rejected} rejected")
    if cds_ok == 0 and lds_ok == 0:
        return f"config not received from XDS server (is Istiod running?): {counts}"
    if cds_rejected > 0 or lds_rejected > 0:
        return f"config received from XDS server, but was rejected: {counts}"
    return f"config not fully received from XDS server: {counts}"


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
