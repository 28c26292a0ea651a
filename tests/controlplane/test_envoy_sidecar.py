"""A real Envoy brought to ready by `pilotfish controlplane` alone, over Delta ADS and over SotW,
and carrying captured traffic both ways.

Everything runs in a pod network namespace with `pilotfish init`'s capture rules (the injection
template's flags, REDIRECT), beside a peer namespace that owns a "service" address (the harness
of the init tests, tests/init/netns.py). Why a namespace: the listeners must be on 15001 and
15006, which a namespace has free, and capture is what the listeners are for. A connection made
straight to 15001 proves nothing: its original destination is 15001 itself, which the
blackhole chain drops, so only a redirected connection can show the passthrough working.

- The control plane runs in the pod namespace (as root), on 127.0.0.1, with a token file.
- Envoy runs as uid 1337 (capture leaves its own traffic alone) with an ADS bootstrap: the
  `xds-grpc` cluster dials the control plane with TLS trusting its root and the server name
  `istiod.istio-system.svc`, the bearer token as `initial_metadata`, CDS and LDS over ADS
  (DELTA_GRPC or GRPC). Its admin API is on a unix socket, which the test reaches from outside
  the namespace.
- Outbound: an app (uid 1000) dials the service address; capture sends it to 15001, Envoy's
  PassthroughCluster dials the original destination, the listener in the peer answers.
- Inbound: the peer dials the pod's address; capture sends it to 15006, Envoy's
  InboundPassthroughCluster dials the app from 127.0.0.6, which capture lets through.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns as N
import pytest
from envoy_proc import ENVOY, Envoy
from netns import APP_UID, POD_V4, PROXY_UID, SVC_V4, Topology
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)
from procs import PILOTFISH, Process

TOKEN = "envoy-test-token"
MESH = """\
services:
  - {name: details, namespace: default, clusterIP: 10.96.0.20, ports: [9080]}
"""
INIT_FLAGS = ["-p", "15001", "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT", "-i", "*", "-x", "",
              "-b", "*", "-d", "15090,15021,15020", "--ipv6", "off"]
UPSTREAM_PORT, APP_PORT = 8080, 9080



class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: Envoy's admin API, reachable from outside its namespace."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


class Sidecar(Envoy):
    """Envoy as uid 1337 in the pod namespace, in a directory of its own (tmp_path's parents are
    closed to other users), with an ADS bootstrap pointing at the control plane; its admin API on
    a unix socket."""

    def __init__(self, topo: Topology, api_type: str, cp_port: int, root_pem: bytes) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="pilotfish-envoy-"))
        os.chown(self.work, PROXY_UID, PROXY_UID)
        (self.work / "root-cert.pem").write_bytes(root_pem)
        self.admin_socket = str(self.work / "admin.sock")
        self.log = self.work / "envoy.log"
        config = self.work / "envoy.json"
        config.write_text(json.dumps(bootstrap(api_type, cp_port, str(self.work / "root-cert.pem"), self.admin_socket)))
        argv = [str(ENVOY), "-c", str(config), "--disable-hot-restart", "-l", "info", "--log-path", str(self.log)]
        self.proc = subprocess.Popen(N.ns_argv(topo.pod, argv, PROXY_UID), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        self._wait(lambda: os.path.exists(self.admin_socket), "admin socket")

    def admin(self, path: str) -> str:
        connection = UnixHTTPConnection(self.admin_socket)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode()
        finally:
            connection.close()
        if response.status != 200:
            raise OSError(f"{path}: HTTP {response.status}: {body[:200]}")
        return body

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.work, ignore_errors=True)


def bootstrap(api_type: str, cp_port: int, root_file: str, admin_socket: str) -> dict[str, Any]:
    """Envoy's bootstrap for ADS straight at the control plane, as a test needs it: the node
    the control plane reads (id and INSTANCE_IPS), CDS and LDS over ADS, and the xds-grpc
    cluster with TLS and the bearer token."""
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": f"sidecar~{POD_V4}~app.default~default.svc.cluster.local", "cluster": "app.default",
                 "metadata": {"INSTANCE_IPS": POD_V4, "CLUSTER_ID": "Kubernetes"}},
        "admin": {"address": {"pipe": {"path": admin_socket}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type, "transport_api_version": "V3", "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"},
                                   "initial_metadata": [{"key": "authorization", "value": f"Bearer {TOKEN}"}]}]},
            "cds_config": ads, "lds_config": ads},
        "static_resources": {"clusters": [{
            "name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": cp_port}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "istiod.istio-system.svc",
                "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {
                    "trusted_ca": {"filename": root_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "istiod.istio-system.svc"}}]}}}},
        }]},
    }


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[tuple[Topology, Process]]:
    """A pod namespace with capture installed and the control plane running in it."""
    backend = next(b for b in N.BACKENDS if N.backend_skip_reason(b) is None)
    with N.topology() as topo:
        N.run(N.ns_argv(topo.pod, [N.pilotfish_bin(), "init", *INIT_FLAGS, "--iptables-backend", backend]))
        (tmp_path / "mesh.yaml").write_text(MESH)
        (tmp_path / "token").write_text(TOKEN + "\n")
        cp = Process(N.ns_argv(topo.pod, [
            PILOTFISH, "controlplane", "--mesh", str(tmp_path / "mesh.yaml"), "--listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / "state"), "--root-cert-out", str(tmp_path / "root-cert.pem"),
            "--token-file", str(tmp_path / "token")]), tmp_path / "controlplane.log")
        try:
            yield topo, cp
        finally:
            cp.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
def test_envoy_becomes_ready_and_carries_captured_traffic(
        pod: tuple[Topology, Process], tmp_path: Path, api_type: str) -> None:
    topo, cp = pod
    port = int(cp.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=30).group(1))
    envoy = Sidecar(topo, api_type, port, (tmp_path / "root-cert.pem").read_bytes())
    try:
        envoy.wait_stat("cluster_manager.cds.update_success", 1)
        envoy.wait_stat("listener_manager.lds.update_success", 1)
        envoy.wait_live()
        kind = "delta stream" if api_type == "DELTA_GRPC" else "stream"
        cp.wait_for(rf"controlplane: {kind} from \S+: node sidecar~{POD_V4}~")
        cp.wait_for(r"accepted CDS version")
        cp.wait_for(r"accepted LDS version")
        assert envoy.stat("cluster_manager.cds.update_rejected") == 0
        assert envoy.stat("listener_manager.lds.update_rejected") == 0

        dump = envoy.admin("/config_dump?resource=dynamic_listeners")
        listeners = {entry["name"]: entry["active_state"]["listener"]["address"]["socket_address"]
                     for entry in json.loads(dump)["configs"]}
        assert listeners == {"virtualOutbound": {"address": "0.0.0.0", "port_value": 15001},
                             "virtualInbound": {"address": "0.0.0.0", "port_value": 15006}}

        # outbound: the app dials the service, Envoy's passthrough reaches the peer's listener
        topo.tcp_listener(topo.peer, SVC_V4, UPSTREAM_PORT, tag="upstream")
        result = topo.tcp_connect(topo.pod, SVC_V4, UPSTREAM_PORT, uid=APP_UID)
        assert result.get("ok"), f"outbound: {result}\n{envoy.tail()}"
        assert result["reply"]["tag"] == "upstream"
        assert result["reply"]["peer"].startswith(f"{POD_V4}:")
        assert envoy.stat("cluster.PassthroughCluster.upstream_cx_total") >= 1

        # inbound: the peer dials the app, Envoy's inbound passthrough dials it from 127.0.0.6
        topo.tcp_listener(topo.pod, "0.0.0.0", APP_PORT, uid=APP_UID, tag="app")
        result = topo.tcp_connect(topo.peer, POD_V4, APP_PORT, uid=0)
        assert result.get("ok"), f"inbound: {result}\n{envoy.tail()}"
        assert result["reply"]["tag"] == "app"
        assert result["reply"]["peer"].startswith("127.0.0.6:")
        assert envoy.stat("cluster.InboundPassthroughCluster.upstream_cx_total") >= 1
    finally:
        envoy.stop()
