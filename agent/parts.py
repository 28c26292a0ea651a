"""The components the agent is made of (agent/components.py says what a component is): each
wraps one server of another package and adds its part of readiness."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from pilotfish.dns.server import BuiltLookup, DnsProxy
from pilotfish.dns.table import debug_view
from pilotfish.xds_client.nds import BuiltTable, NameTableType
from pilotfish.xds_client.resources import ResourceCache, Served
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import XdsClient

from .status import DNS_NOT_READY, StatusServer

log = logging.getLogger("pilotfish.agent")


class DnsPart:
    """The DNS proxy, serving the name table the cache holds (pushed, or saved by a run before).

    Not ready until it has a table: a pod whose DNS capture answers nothing for mesh names must
    not get traffic (Istio's readiness says the same)."""

    name = "dns"

    def __init__(self, proxy: DnsProxy, cache: ResourceCache, saved_path: str, namespace: str, domain: str) -> None:
        self.proxy = proxy
        self.cache = cache
        self.nds = NameTableType(proxy.build_table)
        self.subscription = SavedCopy(self.nds, saved_path)  # what the xDS client subscribes to for it
        self._view = (namespace, domain)
        cache.watch(self.nds, self._serve_table)

    def _serve_table(self, table: BuiltTable[BuiltLookup]) -> None:
        self.proxy.install(table.built.lookup, table.built.build_seconds)

    def ndsz(self) -> Mapping[str, object] | None:
        """The /debug/ndsz view of the table being served (None before one)."""
        served: Served[BuiltTable[BuiltLookup]] | None = self.cache.get(self.nds)
        return None if served is None else debug_view(served.value.message().table, *self._view)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.proxy.serve(task_status=task_status)

    def ready(self) -> str | None:
        return DNS_NOT_READY if self.proxy.table is None else None


@dataclass
class XdsPart:
    """The ADS stream to the control plane. Started once the copies saved by an earlier run
    serve (so a restart without a control plane serves at once); the stream itself never makes
    the pod unready: what it feeds says so (a DNS proxy without a table).

    With Envoy (`stream` False) the agent opens no stream of its own: its subscriptions ride
    Envoy's streams through the xDS proxy (xds_client/proxy.py, one connection per pod as
    Istio's agent has), and this part only serves the saved copies."""

    client: XdsClient
    name: str = "xds"
    stream: bool = True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.client.subscriptions:
            log.info("agent: no DNS proxy: nothing to subscribe to yet")
            task_status.started()
            return
        await trio.to_thread.run_sync(self.client.load_saved)
        task_status.started()
        if self.stream:
            await self.client.run()

    def ready(self) -> str | None:
        return None


@dataclass
class StatusPart:
    """The status server on 15020 (agent/status.py)."""

    server: StatusServer
    name: str = "status"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.server.serve(task_status=task_status)

    def ready(self) -> str | None:
        return None
