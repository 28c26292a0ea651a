"""The running agent's status port answers the application's probes and merges the
application's metrics (agent/command.py wires agent/prober.py and agent/metricsmerge.py in);
the parts are tested alone in test_status_probes.py and test_status_metrics.py."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import PILOTFISH, Process


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802  http.server's naming
        body = b"# TYPE app_requests_total counter\napp_requests_total 7\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app_metrics() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_agent_answers_app_probes_and_merges_app_metrics(tmp_path: Path, app_metrics: int) -> None:
    app = socket.create_server(("127.0.0.1", 0))  # the application's TCP port the probe checks
    app_port = app.getsockname()[1]
    env = {**os.environ, "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}', "CA_ROOT_CA": "SYSTEM",
           "INSTANCE_IP": "127.0.0.1",
           "ISTIO_KUBE_APP_PROBERS": json.dumps({"/app-health/web/livez": {"tcpSocket": {"port": app_port}}}),
           "ISTIO_PROMETHEUS_ANNOTATIONS": json.dumps({"scrape": "true", "port": str(app_metrics)})}
    agent = Process([PILOTFISH, "agent", "--status-listen", "127.0.0.1:0"], tmp_path / "agent.log", env=env,
                    cwd=tmp_path)
    try:
        port = int(agent.wait_for(r"status: listening on port (\d+)").group(1))
        assert get(port, "/app-health/web/livez")[0] == 200
        app.close()
        assert get(port, "/app-health/web/livez")[0] == 500  # refused: the probe fails
        assert get(port, "/app-health/other/livez")[0] == 400  # not configured
        status, body = get(port, "/stats/prometheus")
        assert status == 200
        assert b"app_requests_total 7" in body and b"istio_agent_" in body, body[-2000:]
    finally:
        app.close()
        assert agent.stop() == 0
