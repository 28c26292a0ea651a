"""Envoy's admin API as the agent uses it: readiness stats, active connections, drains, quit.

Every call is bounded (agent/httpclient.py: time, head and body size); a failure is an
AdminError saying what failed. The admin listens on loopback only (the bootstrap's
127.0.0.1:15000, or ::1 for an IPv6-only pod).
"""

from __future__ import annotations

from dataclasses import dataclass

from pilotfish.agent import httpclient

from .readiness import ACTIVE_CONNECTIONS_STATS, READINESS_STATS, parse_stats

TIMEOUT = 2.0  # seconds: Istio gives the connection count 2 s (its CDS/LDS counts 1 s, its server state 3 s)
MAX_STATS = 1 << 20  # the filtered stats are a few lines; a whole /stats of a large mesh is not asked for


class AdminError(Exception):
    pass


@dataclass(frozen=True)
class Admin:
    host: str
    port: int

    async def _call(self, path: str, method: str = "GET") -> bytes:
        try:
            reply = await httpclient.get(self.host, self.port, path, [], timeout=TIMEOUT, max_body=MAX_STATS,
                                         method=method)
        except httpclient.FetchError as err:
            raise AdminError(f"{method} {path}: {err}") from None
        if reply.status != 200 or reply.over:
            raise AdminError(f"{method} {path}: HTTP {reply.status}" + (" (answer too large)" if reply.over else ""))
        return reply.body

    async def readiness_stats(self) -> dict[str, int]:
        return parse_stats((await self._call(READINESS_STATS)).decode("utf-8", "replace"))

    async def connection_stats(self) -> dict[str, int]:
        return parse_stats((await self._call(ACTIVE_CONNECTIONS_STATS)).decode("utf-8", "replace"))

    async def drain_listeners(self, *, inbound_only: bool, skip_exit: bool) -> None:
        """Istio's drain: graceful (listeners keep accepting while Envoy tells clients to go),
        inbound listeners only for a sidecar (its outbound calls must go on while it drains),
        `skip_exit` for POST /drain, which must not stop Envoy."""
        query = "inboundonly&graceful" if inbound_only else "graceful"
        await self._call(f"/drain_listeners?{query}" + ("&skip_exit" if skip_exit else ""), "POST")
