"""What the ADS tests of both variants feed a stream: a stand-in mesh snapshot and a proxy's node.

The stand-in's table has one host named after the mesh version, answering with the proxy's own
IPs, so a test sees both which version it got and that it was built for it; its Envoy config is
the real one (controlplane/envoyconfig.py), which does not change with the version.
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.struct_pb2 import Struct

from pilotfish.controlplane.envoyconfig import sidecar_config
from pilotfish.controlplane.mesh import parse_mesh
from pilotfish.controlplane.nametable import ProxyInfo
from pilotfish.controlplane.served import Snapshot
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

NODE_ID = "sidecar~10.1.1.5~pod.ns~ns.svc.cluster.local"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"  # not served (routes are inline)
EMPTY_MESH = parse_mesh("")


def snapshot(version: str, host: str | None = None) -> Snapshot:
    """The stand-in mesh at `version`; its one host is `<host or version>.example.com`."""
    def table_for(proxy: ProxyInfo) -> NameTable:
        return NameTable(table={f"{host or version}.example.com": NameTable.NameInfo(ips=list(proxy.ips))})

    return Snapshot(version, table_for, 1, lambda proxy: sidecar_config(EMPTY_MESH, proxy))


def node(node_id: str = NODE_ID, **metadata: str) -> Node:
    meta = Struct()
    meta.update(metadata)
    return Node(id=node_id, cluster="istio-proxy", metadata=meta)
