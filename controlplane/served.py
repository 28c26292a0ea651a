"""What the control plane serves: a snapshot of the mesh and, from it, each proxy's resources of
each type (the NameTable, Envoy's clusters and listeners), each with a name and a version.

A resource's version is a digest of its serialized content, so both ADS variants can tell what
changed for one proxy between two snapshots: a mesh change that leaves a proxy's table or its
Envoy config as it was is not pushed to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message
from pilotfish.xds_client.nds import TYPE_URL as NAME_TABLE_TYPE
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

from .envoyconfig import SidecarConfig
from .nametable import ProxyInfo

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SERVED_TYPES = (NAME_TABLE_TYPE, CLUSTER_TYPE, LISTENER_TYPE, ENDPOINT_TYPE)
# istiod sends the NameTable as one resource without a name (docs/istio-compat.md "istiod: delta
# xDS"); an agent reads the first resource whatever its name.
NAME_TABLE_NAME = ""


@dataclass(frozen=True)
class Resource:
    name: str
    version: str  # digest of `body.value`
    body: Any
    entries: int  # for log lines: hosts in a table, 1 for an Envoy resource


@dataclass(frozen=True)
class Snapshot:
    """What the control plane serves right now: a mesh version and the resources for any proxy."""

    version: str
    table_for: Callable[[ProxyInfo], NameTable]
    hosts: int  # for log lines only
    envoy_for: Callable[[ProxyInfo], SidecarConfig]

    def resources(self, type_url: str, proxy: ProxyInfo) -> dict[str, Resource]:
        """`proxy`'s resources of a served type (SERVED_TYPES), by name, in order."""
        if type_url == NAME_TABLE_TYPE:
            table = self.table_for(proxy)
            return {NAME_TABLE_NAME: _resource(NAME_TABLE_NAME, table, len(table.table))}
        config = self.envoy_for(proxy)
        if type_url == ENDPOINT_TYPE:
            return {a.cluster_name: _resource(a.cluster_name, a, len(a.endpoints)) for a in config.endpoints}
        messages: tuple[Message, ...] = config.clusters if type_url == CLUSTER_TYPE else config.listeners
        return {m.name: _resource(m.name, m, 1) for m in messages}  # type: ignore[attr-defined]


def _resource(name: str, message: Message, entries: int) -> Resource:
    # deterministic: a map (the table's hosts) serialized in another order would look changed
    value = message.SerializeToString(deterministic=True)
    body = Any(type_url=f"type.googleapis.com/{message.DESCRIPTOR.full_name}", value=value)
    return Resource(name, hashlib.sha256(value).hexdigest()[:16], body, entries)
