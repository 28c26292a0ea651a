"""What the control plane serves, kept current: the mesh file plus the auto-registered
WorkloadEntries (controlplane/autoregister.py), as one snapshot published to every stream
(ads.MeshHub) whenever either changes. The thin, thread-safe shell around the pure registry: ADS
streams (grpcio's threads) connect, report health and disconnect; the command's loop expires
entries and sets a reloaded mesh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable

from envoy.config.core.v3.base_pb2 import Node
from pilotfish.common.ratelog import RateLimitedLog

from .ads import MeshHub
from .autoregister import (
    Disconnected,
    Event,
    HealthChanged,
    Reconnected,
    Refused,
    Registered,
    RegistrationError,
    Registry,
    Removed,
    registration,
)
from .mesh import Mesh
from .nametable import ProxyInfo
from .served import Snapshot
from .workloads import WorkloadEntry

log = logging.getLogger("pilotfish.controlplane")

# Registry changes (entries registered or removed, health) are published at most once a second;
# one within a second of the last publish is held back and published by the next `expire`
# (the command calls it at least once a second). Each publish has every stream rebuild its
# proxy's config (57 ms at 1,000 services, docs/controlplane.md) and is queued to every stream:
# a VM flipping its reported health on every request was one rebuild per proxy per request.
# A reloaded mesh file is published at once.
PUBLISH_INTERVAL = 1.0


def entries_version(mesh_version: str, entries: tuple[WorkloadEntry, ...]) -> str:
    """The served version: the mesh file's while nothing is registered, else a digest of both."""
    if not entries:
        return mesh_version
    content = json.dumps([mesh_version, [[e.namespace, e.name, e.address, sorted(e.labels.items()),
                                          e.service_account, e.network, sorted(e.ports.items()), e.health]
                                         for e in entries]], separators=(",", ":"))
    return hashlib.sha256(content.encode()).hexdigest()[:16]


class ServedModel:
    """The mesh and the registry behind one lock; `hub` is what the ADS server serves from."""

    def __init__(self, mesh: Mesh, mesh_version: str, build: Callable[[Mesh, str], Snapshot],
                 registry: Registry | None = None, clock: Callable[[], float] = time.monotonic,
                 publish_interval: float = PUBLISH_INTERVAL) -> None:
        """`build` makes a snapshot of a mesh (with its entries) at a version (command.snapshot_of);
        registry changes are published at most once per `publish_interval`."""
        self._lock = threading.Lock()
        self._publish_interval = publish_interval
        self._published_at: float | None = None
        self._held: str | None = None  # why, of a change not published yet
        self._mesh, self._mesh_version = mesh, mesh_version
        self._build = build
        self.registry = registry if registry is not None else Registry()
        self._clock = clock
        self._refusals = RateLimitedLog(log)
        self.hub = MeshHub(self._snapshot())

    @property
    def mesh_version(self) -> str:
        with self._lock:
            return self._mesh_version

    def _snapshot(self) -> Snapshot:
        entries = self.registry.entries(self._mesh.workload_groups)
        return self._build(self._mesh.with_entries(entries), entries_version(self._mesh_version, entries))

    def _publish(self, why: str, at_once: bool = False) -> int:
        """With the lock held: publish the current model if its version changed; the streams told.
        Unless `at_once`, held back when the last publish was less than the interval ago."""
        now = self._clock()
        if not at_once and self._published_at is not None and now - self._published_at < self._publish_interval:
            self._held = self._held or why
            return 0
        self._held = None
        snapshot = self._snapshot()
        if snapshot.version == self.hub.current.version:
            return 0
        self._published_at = now
        streams = self.hub.publish(snapshot)
        entries = f", {len(self.registry)} workload entries" if len(self.registry) else ""
        log.info("controlplane: serving mesh version %s (%d hosts%s), pushing to %d streams (%s)",
                 snapshot.version, snapshot.hosts, entries, streams, why)
        return streams

    def set_mesh(self, mesh: Mesh, version: str, why: str) -> int:
        """A reloaded mesh file, served with the entries; returns the streams told."""
        with self._lock:
            self._mesh, self._mesh_version = mesh, version
            return self._publish(why, at_once=True)

    def connect(self, connection: str, node: Node, proxy: ProxyInfo, identity: str | None = None) -> Refused | None:
        """A stream opened, authenticated as `identity` (autoregister.identity_problem): the
        proxy's entry if its node asks for one; a Refused to end the stream with."""
        try:
            reg = registration(node, proxy)
        except RegistrationError as err:
            refused = Refused(f"auto-registration of {node.id} refused: {err}")
            self._refusals(logging.WARNING, "controlplane: %s", refused.reason)
            return refused
        if reg is None:
            return None
        with self._lock:
            events = self.registry.connect(connection, reg, self._mesh.workload_groups, self._clock(), identity)
            self._log(events)
            self._publish(f"{node.id} connected")
        return next((e for e in events if isinstance(e, Refused)), None)

    def report_health(self, connection: str, healthy: bool, detail: str) -> None:
        with self._lock:
            events = self.registry.report_health(connection, healthy, detail)
            if events:
                self._log(events)
                self._publish("workload health")

    def disconnect(self, connection: str) -> None:
        with self._lock:
            self._log(self.registry.disconnect(connection, self._clock()))

    def expire(self) -> None:
        """Remove the entries whose grace period is over (called every fraction of it, and at
        least once a second), and publish a change held back."""
        with self._lock:
            events = self.registry.expire(self._clock())
            if events:
                self._log(events)
                self._publish("workload entries removed")
            elif self._held is not None:
                self._publish(self._held)

    def _log(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case Registered(namespace=ns, name=name, address=address, health_checked=checked):
                    log.info("controlplane: registered WorkloadEntry %s/%s (address %s%s)", ns, name, address,
                             ", not ready until its agent reports healthy" if checked else "")
                case Reconnected(namespace=ns, name=name):
                    log.info("controlplane: WorkloadEntry %s/%s reconnected", ns, name)
                case HealthChanged(namespace=ns, name=name, healthy=healthy, reason=reason):
                    log.info("controlplane: WorkloadEntry %s/%s is %s", ns, name,
                             "healthy" if healthy else f"unhealthy: {reason:.300}")
                case Disconnected(namespace=ns, name=name):
                    log.info("controlplane: WorkloadEntry %s/%s disconnected; removed in %gs unless it reconnects",
                             ns, name, self.registry.grace)
                case Removed(namespace=ns, name=name, why=why):
                    log.info("controlplane: removed WorkloadEntry %s/%s (%s)", ns, name, why)
                case Refused(reason=reason):
                    # anyone with a token can ask for entries: a line per interval
                    self._refusals(logging.WARNING, "controlplane: %s", reason)
