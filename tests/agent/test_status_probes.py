"""The status server's application probes against real servers on loopback: an HTTP application
(200, 500, redirects kept on the host, sent elsewhere, looping; a long body; headers), a TCP
listener, a gRPC health server implemented by name; every probe comes from 127.0.0.6; a flood of
probe requests never opens more than PROBES_AT_ONCE connections to the application."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ca_harness import write_mounted_certs
from prometheus_client import CollectorRegistry

from pilotfish.agent.appprobe import MAX_BODY, app_probe_config
from pilotfish.agent.prober import AppProber
from pilotfish.agent.status import PROBES_AT_ONCE, StatusServer, StatusSources

from .status_targets import App, TcpListener, get, grpc_health, loopback, poll, reply, run_status

SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"


def prober(probes: dict[str, dict[str, object]]) -> AppProber:
    return AppProber(app_probe_config({"ISTIO_KUBE_APP_PROBERS": json.dumps(probes), "INSTANCE_IP": "127.0.0.1"}))


def status_server(probes: AppProber) -> StatusServer:
    sources = StatusSources(lambda: None, CollectorRegistry(), lambda: None, lambda: None, probes=probes)
    return StatusServer(loopback(), sources)


def http_probe(port: int, path: str, **extra: object) -> dict[str, object]:
    return {"httpGet": {"path": path, "port": port, **extra}, "timeoutSeconds": 5}


def test_http_probes_follow_kubelets_rules_from_127_0_0_6() -> None:
    long_body = b"x" * (MAX_BODY + 5000)
    routes = {
        "/ok": reply(200, b"fine"),
        "/fail": reply(500, b"broken"),
        "/same-host": reply(302, headers={"Location": "/ok"}),
        "/same-host-fail": reply(301, headers={"Location": "/fail"}),
        "/other-host": reply(302, headers={"Location": "http://elsewhere.example/"}),
        "/loop": reply(302, headers={"Location": "/loop"}),
        "/no-location": reply(302),
        "/long": reply(200, long_body),
        "/headers": reply(200),
        "/bad-ipv6": reply(302, headers={"Location": "http://[::1/x"}),
        "/bad-port": reply(302, headers={"Location": "http://127.0.0.1:port/"}),
        "/ftp": reply(302, headers={"Location": "ftp://127.0.0.1/"}),
    }
    with App(routes) as app:
        config = {f"/app-health/c/{name}": http_probe(app.port, target) for name, target in [
            ("livez", "/ok"), ("readyz", "/fail"), ("startupz", "/same-host")]}
        config |= {f"/app-health/{name}/livez": http_probe(app.port, "/" + name) for name in [
            "same-host-fail", "other-host", "loop", "no-location", "long", "bad-ipv6", "bad-port", "ftp"]}
        config["/app-lifecycle/c/prestopz"] = http_probe(app.port, "headers",
                                                         httpHeaders=[{"name": "X-Probe", "value": "configured"},
                                                                      {"name": "X-Kubelet", "value": "not sent"}])
        answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}

        def client(port: int) -> None:
            for path in config:
                answers[path] = get(port, path, headers={"X-Kubelet": "kubelet", "Host": f"pod:{port}"})
            answers["unknown"] = get(port, "/app-health/c/poststartz")

        run_status(status_server(prober(config)), client)

        assert answers["/app-health/c/livez"][:2] == (200, b"fine")
        assert answers["/app-health/c/readyz"][:2] == (500, b"broken")
        assert answers["/app-health/c/startupz"][:2] == (200, b"fine")  # followed on the same host
        assert answers["/app-health/same-host-fail/livez"][0] == 500
        assert answers["/app-health/other-host/livez"][:2] == (200, b"")  # another host: success, not followed
        assert answers["/app-health/loop/livez"][0] == 500  # more than 10 redirects
        assert app.paths.count("/loop") == 11  # the first request and 10 redirects followed
        assert answers["/app-health/no-location/livez"][:2] == (200, b"")
        assert answers["/app-health/long/livez"][:2] == (200, long_body[:MAX_BODY])
        assert answers["/app-lifecycle/c/prestopz"][0] == 200
        for bad in ("bad-ipv6", "bad-port", "ftp"):  # a Location that cannot be followed fails the probe
            assert answers[f"/app-health/{bad}/livez"][0] == 500
        assert answers["unknown"][:2] == (400, b"app prober config does not exists for /app-health/c/poststartz")
        sent = app.headers[app.paths.index("/headers")]
        assert sent["X-Kubelet"] == "kubelet" and sent["X-Probe"] == "configured"  # kubelet's win, config's added
        assert sent["Host"] == f"pod:{app.port}"  # the status port in Host becomes the application's
        assert sent["Connection"] == "close"
        assert set(app.peers) == {"127.0.0.6"}


def test_https_probes_do_not_check_the_certificate(tmp_path: Path) -> None:
    write_mounted_certs(tmp_path)  # a certificate for a SPIFFE name, issued by a root nobody trusts
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert-chain.pem", tmp_path / "key.pem")
    with App({"/ok": reply(200, b"secure"), "/hop": reply(302, headers={"Location": "/ok"})}, tls=tls) as app:
        config = {"/app-health/c/livez": http_probe(app.port, "/ok", scheme="HTTPS"),
                  "/app-health/c/readyz": http_probe(app.port, "/hop", scheme="HTTPS")}
        answers = []

        def client(port: int) -> None:
            answers.extend(get(port, path)[:2] for path in config)

        run_status(status_server(prober(config)), client)
        assert answers == [(200, b"secure"), (200, b"secure")]  # the redirect followed over TLS too
        assert set(app.peers) == {"127.0.0.6"}


def test_tcp_and_grpc_probes_from_127_0_0_6() -> None:
    listener = TcpListener()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections to its port are refused
    try:
        with grpc_health({b"": SERVING, b"\x0a\x04down": NOT_SERVING}) as (grpc_port, grpc_peers):
            config = {
                "/app-health/tcp/livez": {"tcpSocket": {"port": listener.port}, "timeoutSeconds": 5},
                "/app-health/tcp/readyz": {"tcpSocket": {"port": closed.getsockname()[1]}, "timeoutSeconds": 5},
                "/app-health/grpc/livez": {"grpc": {"port": grpc_port}, "timeoutSeconds": 5},
                "/app-health/grpc/readyz": {"grpc": {"port": grpc_port, "service": "down"}, "timeoutSeconds": 5},
                "/app-health/grpc/startupz": {"grpc": {"port": grpc_port, "service": "unknown"},
                                              "timeoutSeconds": 5},
                "/app-health/notgrpc/livez": {"grpc": {"port": listener.port}, "timeoutSeconds": 1},
            }
            answers: dict[str, int] = {}

            def client(port: int) -> None:
                for path in config:
                    answers[path] = get(port, path)[0]

            run_status(status_server(prober(config)), client)
            assert answers == {"/app-health/tcp/livez": 200, "/app-health/tcp/readyz": 500,
                               "/app-health/grpc/livez": 200, "/app-health/grpc/readyz": 500,
                               "/app-health/grpc/startupz": 500, "/app-health/notgrpc/livez": 500}
            assert grpc_peers and all(peer.startswith("ipv4:127.0.0.6:") for peer in grpc_peers)
            assert listener.peers and set(listener.peers) == {"127.0.0.6"}
    finally:
        listener.close()
        closed.close()


def test_a_probe_that_does_not_answer_fails_at_its_timeout() -> None:
    release = threading.Event()
    with App({"/hang": reply(200, hold=release)}) as app:
        config = {"/app-health/c/livez": {"httpGet": {"path": "/hang", "port": app.port}, "timeoutSeconds": 1}}
        answers: list[int] = []

        def client(port: int) -> None:
            answers.append(get(port, "/app-health/c/livez")[0])
            release.set()

        run_status(status_server(prober(config)), client)
        assert answers == [500]


def test_a_probe_flood_opens_at_most_probes_at_once_connections_to_the_app() -> None:
    release = threading.Event()
    flood = 3 * PROBES_AT_ONCE
    with App({"/slow": reply(200, b"ok", hold=release)}) as app:
        config = {"/app-health/c/livez": http_probe(app.port, "/slow")}
        server = status_server(prober(config))
        answers: list[int] = []

        def client(port: int) -> None:
            with ThreadPoolExecutor(flood) as pool:
                results = [pool.submit(get, port, "/app-health/c/livez") for _ in range(flood)]
                poll(lambda: app.serving == PROBES_AT_ONCE and
                     server._probes.statistics().tasks_waiting == flood - PROBES_AT_ONCE,
                     "the probe slots taken, the rest waiting")
                release.set()
                answers.extend(result.result()[0] for result in results)

        run_status(server, client)
        assert answers == [200] * flood
        assert app.most_at_once == PROBES_AT_ONCE
