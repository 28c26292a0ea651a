"""The components the agent is made of (agent/components.py says what a component is): each
wraps one server of another package and adds its part of readiness."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from pilotfish.common.systemd import Notifier
from pilotfish.dns.server import BuiltLookup, DnsProxy
from pilotfish.dns.table import debug_view
from pilotfish.xds_client.nds import BuiltTable, NameTableType
from pilotfish.xds_client.resources import ResourceCache, Served
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import XdsClient

from .status import DNS_NOT_READY, StatusServer

log = logging.getLogger("pilotfish.agent")
READINESS_POLL = 0.1  # seconds between readiness checks until READY=1 is sent


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


@dataclass
class SystemdPart:
    """systemd's notify protocol (common/systemd.py) for the VM unit of `Type=notify`: READY=1
    once the agent is ready (the unit then counts as started), STATUS= with what it waits for,
    WATCHDOG=1 at half the unit's WatchdogSec from the agent's own event loop (a loop that hangs
    stops the pings, and systemd restarts the agent), STOPPING=1 on the way out."""

    notifier: Notifier
    readiness: Callable[[], str | None]
    watchdog: float | None  # seconds between pings; None without WatchdogSec
    name: str = "systemd"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        said: str | None = None
        ready = False
        last_ping = -math.inf
        try:
            while True:
                if not ready:
                    reason = self.readiness()
                    if reason is None:
                        ready = self.notifier.send(READY="1", STATUS="ready")
                    elif reason != said:
                        self.notifier.send(STATUS=f"not ready: {reason}")
                        said = reason
                now = trio.current_time()
                if self.watchdog is not None and now - last_ping >= self.watchdog:
                    self.notifier.send(WATCHDOG="1")
                    last_ping = now
                await trio.sleep(min(READINESS_POLL if not ready else math.inf, self.watchdog or math.inf))
        finally:
            self.notifier.send(STOPPING="1")
            self.notifier.close()

    def ready(self) -> str | None:
        return None
