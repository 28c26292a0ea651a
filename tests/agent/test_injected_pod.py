"""Istio's rendered injection (`hello.yaml.injected`) run on one machine with pilotfish as both
containers: every word the template calls, Envoy brought to ready through the agent's xDS
proxy, the status port, and the pod's end (tests/pod_harness.py says what stands for what).

Root only (network namespaces, iptables, uid 1337); each test starts one pod against its own
`pilotfish controlplane` in the peer namespace."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import netns as N
import pytest
from netns import APP_UID, POD_V4
from pod_harness import POD, PROXY_UID, Pod, ns_connect, ns_http, pilot_agent
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)
from prometheus_client.parser import text_string_to_metric_families

MESH = """\
services:
  - {name: hello, namespace: default, clusterIP: 10.96.0.30, ports: [80]}
"""
APP_PORT = 80
# the hello app: /healthz for the rewritten probe, /metrics for the merged metrics, and an
# echo of every other request line (a long-lived connection holds a request open)
APP = """\
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/metrics":
            body = b"# TYPE hello_requests_total counter\\nhello_requests_total 3\\n"
        else:
            body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("ready", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""
# what the injector writes for a container with an HTTP liveness probe on /healthz
PROBERS = {"/app-health/hello/livez": {"httpGet": {"path": "/healthz", "port": APP_PORT}, "timeoutSeconds": 2}}
PROM = {"scrape": "true", "port": str(APP_PORT), "path": "/metrics"}



@pytest.fixture
def pod() -> Iterator[Pod]:
    """A pod with capture installed (the istio-init container), its control plane running and
    the hello app listening; the istio-proxy container is the test's to start."""
    with N.topology() as topo:
        work = Path(tempfile.mkdtemp(prefix="pilotfish-pod-"))  # tmp_path's parents are closed to 1337
        pod = Pod(topo, work)
        try:
            pod.start_controlplane(MESH)
            root_pem = pod.root / "var/run/secrets/istio/root-cert.pem"
            _wait(lambda: root_pem.exists() and root_pem.stat().st_size > 0, "the control plane's root certificate",
                  pod, "cp/log")
            done = pod.init()
            assert done.returncode == 0, done.stdout + done.stderr
            N.run(N.ns_argv(topo.pod, ["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]))
            app = pod.spawn(topo.pod, [sys.executable, "-c", APP, str(APP_PORT)], work / "app.log", uid=APP_UID)
            _wait(lambda: "ready" in pod.log("app.log") or app.poll() is not None, "the app", pod, "app.log")
            assert app.poll() is None, pod.log("app.log")
            yield pod
        finally:
            pod.stop()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def _wait(condition: object, what: str, pod: Pod, log: str = "agent.log", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout}s; {log}:\n{pod.log(log)[-4000:]}")


def _status(pod: Pod, path: str, port: int = 15020) -> tuple[int, bytes]:
    """A request to the pod's port from the peer namespace, as kubelet or Prometheus makes it."""
    try:
        status, body, _ = ns_http(pod.topo.peer, POD_V4, port, path)
    except OSError as err:
        return 0, str(err).encode()
    return status, body


def _proxy_env() -> dict[str, str]:
    return {"ISTIO_KUBE_APP_PROBERS": json.dumps(PROBERS), "ISTIO_PROMETHEUS_ANNOTATIONS": json.dumps(PROM),
            "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true", "MINIMUM_DRAIN_DURATION": "1s"}


def _wait_ready(pod: Pod, proxy: subprocess.Popen[bytes]) -> list[bytes]:
    """Poll /healthz/ready on 15020 until 200; the bodies of the 503s seen meanwhile."""
    reasons: list[bytes] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proxy.poll() is None, f"the agent exited {proxy.returncode}:\n{pod.log()[-4000:]}"
        status, body = _status(pod, "/healthz/ready")
        if status == 200:
            return reasons
        if status == 503:
            reasons.append(body)
        time.sleep(0.05)
    raise AssertionError(f"not ready in 90 s, last {reasons[-1:]}:\n{pod.log()[-4000:]}")


def _pod_pids(pod: Pod) -> set[int]:
    out = N.run(["ip", "netns", "pids", pod.topo.pod]).stdout.split()
    return {int(pid) for pid in out}


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _envoys(pod: Pod) -> list[int]:
    return [pid for pid in _pod_pids(pod) if Path(_command(pid).split(" ")[0]).name == "envoy"]  # not a path with "envoy" in it


def _in_pod(pod: Pod, *argv: str) -> subprocess.CompletedProcess[str]:
    """A word of pilot-agent run in the istio-proxy container (its hooks: uid 1337, cwd its `/`)."""
    return subprocess.run(N.ns_argv(pod.topo.pod, [pilot_agent(), *argv], PROXY_UID, PROXY_UID), cwd=pod.root,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.timeout(240)
def test_injected_pod_becomes_ready_serves_and_drains(pod: Pod) -> None:
    proxy = pod.proxy(_proxy_env())
    reasons = _wait_ready(pod, proxy)
    assert reasons, "ready at the first probe: the 503 phase was not seen"
    assert all(reason.strip() for reason in reasons), reasons  # every 503 names what is missing
    log = pod.log()
    assert "ignoring unknown flags" not in log  # the template's flags are all known
    assert "xds proxy: serving Envoy on ./etc/istio/proxy/XDS" in log, log[-3000:]

    # the bootstrap written where Istio writes it; Envoy's 15021 answers through the agent
    bootstrap = json.loads((pod.root / "etc/istio/proxy/envoy-rev.json").read_text())
    assert bootstrap["node"]["id"] == f"sidecar~{POD_V4}~{POD}.default~default.svc.cluster.local"
    assert _status(pod, "/healthz/ready", 15021)[0] == 200

    # `wait` (the postStart hook with holdApplicationUntilProxyStarts) inside the pod
    done = _in_pod(pod, "wait", "--timeoutSeconds", "30", "--periodMillis", "100")
    assert done.returncode == 0, done.stderr

    # the app's rewritten probe, from kubelet's side
    assert _status(pod, "/app-health/hello/livez")[0] == 200
    assert _status(pod, "/app-health/nope/livez")[0] == 400

    # merged metrics: Envoy's, the agent's and the app's, in one valid text
    status, body = _status(pod, "/stats/prometheus")
    assert status == 200
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert any(name.startswith("envoy_") for name in names), sorted(names)[:20]
    assert any(name.startswith("istio_agent_") for name in names), sorted(names)[:20]
    assert "hello_requests" in names, sorted(names)[:20]

    # Envoy's own 15090 (Prometheus scraping Envoy alone): Istio's statsCompression, gzip when asked
    status, body, headers = ns_http(pod.topo.peer, POD_V4, 15090, "/stats/prometheus",
                                    headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip", headers
    assert b"envoy_server_live" in gzip.decompress(body)

    # captured inbound traffic reaches the app through Envoy (virtualInbound on 15006)
    status, reply, _ = ns_http(pod.topo.peer, POD_V4, APP_PORT, "/through-envoy")
    assert status == 200 and reply == b"hello /through-envoy"

    # the pod's end as kubelet runs it: the preStop hook (POST drain: Envoy drains and stays),
    # then SIGTERM, which stops at once (the drain is done), exit 0, Envoy gone
    envoys = _envoys(pod)
    assert len(envoys) == 1, [_command(pid) for pid in _pod_pids(pod)]
    done = _in_pod(pod, "request", "--debug-port=15020", "POST", "drain")
    assert done.returncode == 0, done.stderr
    _wait(lambda: "envoy: draining (POST /drain)" in pod.log(), "the drain", pod)
    assert _envoys(pod) == envoys  # still serving
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(timeout=60) == 0, pod.log()[-4000:]
    assert "envoy: already drained, stopping at once" in pod.log()
    assert not _envoys(pod), "Envoy outlived the agent"


@pytest.mark.timeout(180)
def test_sigterm_waits_for_the_last_connection(pod: Pod) -> None:
    """EXIT_ON_ZERO_ACTIVE_CONNECTIONS: after SIGTERM readiness fails at once, inbound listeners
    drain, and the agent stays until the last connection through Envoy closes; then exit 0.
    With DNS capture on, as the mesh's DNS users run it."""
    proxy = pod.proxy({**_proxy_env(), "ISTIO_META_DNS_CAPTURE": "true"})
    _wait_ready(pod, proxy)
    # with DNS capture the name table came on Envoy's stream (the proxy took NDS for the agent)
    # and the DNS proxy answers the mesh's names
    answer = N.run(N.ns_argv(pod.topo.pod, ["dig", "+short", "@127.0.0.1", "-p", "15053",
                                            "hello.default.svc.cluster.local"], PROXY_UID, PROXY_UID))
    assert answer.stdout.strip() == "10.96.0.30", answer
    held = ns_connect(pod.topo.peer, POD_V4, APP_PORT)  # captured: through virtualInbound on 15006
    try:
        held.sendall(b"GET /held HTTP/1.1\r\nHost: hello\r\n\r\n")
        reply = b""
        while b"hello /held" not in reply:  # headers and body may come apart; the socket's timeout bounds it
            chunk = held.recv(4096)
            assert chunk, reply
            reply += chunk
        proxy.send_signal(signal.SIGTERM)
        _wait(lambda: _status(pod, "/healthz/ready")[0] != 200, "readiness failing after SIGTERM", pod)
        _wait(lambda: "envoy: 1 active connections left" in pod.log(), "the connection counted", pod)
        assert proxy.poll() is None, "the agent exited with a connection still open"
    finally:
        held.close()
    assert proxy.wait(timeout=60) == 0, pod.log()[-4000:]
    assert "envoy: no active connections left" in pod.log()
    assert not _envoys(pod), "Envoy outlived the agent"


@pytest.mark.timeout(180)
def test_quitquitquit_stops_at_once(pod: Pod) -> None:
    """POST /quitquitquit (loopback only): no drain wait, exit 0, Envoy gone."""
    proxy = pod.proxy()  # terminationDrainDuration 5 s: a drain would show
    _wait_ready(pod, proxy)
    status, _, _ = ns_http(pod.topo.peer, POD_V4, 15020, "/quitquitquit", "POST")
    assert status == 403  # not from the pod itself
    done = _in_pod(pod, "request", "--debug-port=15020", "POST", "quitquitquit")
    assert done.returncode == 0, done.stderr
    assert proxy.wait(timeout=60) == 0, pod.log()[-3000:]
    assert "envoy: stopping at once (quitquitquit)" in pod.log()
    assert not _envoys(pod)


@pytest.mark.timeout(180)
def test_envoy_killed_ends_the_agent_non_zero(pod: Pod) -> None:
    proxy = pod.proxy()
    _wait_ready(pod, proxy)
    envoys = _envoys(pod)
    assert len(envoys) == 1
    os.kill(envoys[0], signal.SIGKILL)
    code = proxy.wait(timeout=60)
    assert code != 0, pod.log()[-3000:]
    assert "envoy: exited by itself with signal SIGKILL" in pod.log(), pod.log()[-3000:]
    assert "Envoy may have been out of memory killed" in pod.log()  # Istio's hint for a SIGKILL


@pytest.mark.timeout(180)
def test_agent_killed_leaves_no_envoy(pod: Pod) -> None:
    """SIGKILL to the agent (OOM killer, a crash): Envoy must not outlive it holding the pod's
    ports (PR_SET_PDEATHSIG), so a restarted container can start its own."""
    proxy = pod.proxy()
    _wait_ready(pod, proxy)
    assert len(_envoys(pod)) == 1
    proxy.kill()
    proxy.wait(timeout=30)
    _wait(lambda: not _envoys(pod), "Envoy gone after the agent was killed", pod)
    again = pod.proxy()  # the container restarted: its Envoy binds the same ports and gets ready
    _wait_ready(pod, again)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0, pod.log()[-3000:]
