"""A real Envoy takes the workload certificate over the agent's SDS socket and serves TLS with
it: a client verifies the chain to the control plane's root and finds the SPIFFE ID; Envoy's
/certs shows the serial the agent holds. Then rotation under continuous new connections: every
handshake succeeds while the serial changes (never judged by Envoy's /ready alone)."""

from __future__ import annotations

import http.client
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from ca_harness import ID, AgentSide, Ca, identity
from envoy_proc import Envoy, available

from pilotfish.agent.identity import workload

pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())), pytest.mark.timeout(120)]


def handshake(port: int, root: Path) -> tuple[int, list[str], bytes]:
    """An HTTPS request to Envoy: (the serial of its certificate, its URI SANs, the body)."""
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False  # a SPIFFE identity: checked below, by URI SAN
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        connection.request("GET", "/")
        body = connection.getresponse().read()  # by Content-Length: not waiting for Envoy's close
        assert connection.sock is not None
        cert = connection.sock.getpeercert()
    finally:
        connection.close()
    assert cert is not None
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]  # type: ignore[misc]
    return int(str(cert["serialNumber"]), 16), uris, body


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Ca, AgentSide, Envoy]]:
    ca = Ca(tmp_path, getattr(request, "param", timedelta(hours=24)))
    agent = AgentSide(identity(tmp_path, ca), str(tmp_path / "uds" / "socket"))  # SDS first, then Envoy
    envoy = Envoy(tmp_path / "envoy", str(tmp_path / "uds" / "socket"))
    yield ca, agent, envoy
    envoy.stop()
    agent.stop()
    ca.stop()


def test_envoy_serves_the_workload_certificate_over_sds(mesh: tuple[Ca, AgentSide, Envoy]) -> None:
    ca, agent, envoy = mesh
    envoy.wait_serving()
    serial, uris, said = handshake(envoy.listener_port(), ca.root_file)
    assert uris == [ID] and said == b"hello from envoy\n"
    assert agent.identity.current is not None and serial == agent.identity.current.serial
    assert serial in envoy.serials()


@pytest.mark.parametrize("mesh", [timedelta(seconds=20)], indirect=True)
def test_rotation_under_continuous_connections(mesh: tuple[Ca, AgentSide, Envoy]) -> None:
    """20 s certificates, renewed at about half their life, for 60 s of new connections."""
    ca, agent, envoy = mesh
    envoy.wait_serving()
    port = envoy.listener_port()
    serials: list[int] = []
    handshakes = 0
    while envoy.stat("sds.default.update_success") < 6:  # the first and five rotations: ~60 s
        serial, uris, said = handshake(port, ca.root_file)  # any failure fails the test
        handshakes += 1
        assert uris == [ID] and said == b"hello from envoy\n"
        if not serials or serials[-1] != serial:
            serials.append(serial)
    assert len(serials) >= 5 and len(set(serials)) == len(serials)
    assert agent.identity.renewals >= 5 and agent.identity.failures == 0
    print(f"{handshakes} handshakes, {len(serials)} serials, all verified")


@pytest.mark.parametrize("mesh", [timedelta(seconds=16)], indirect=True)
def test_the_ca_away_then_back_then_no_token_envoy_serves_throughout(
        mesh: tuple[Ca, AgentSide, Envoy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """16 s certificates, renewed after ~8 s. The CA goes away across a renewal (each failed
    renewal is Istio's five attempts, ~1.5 s, then a short wait): Envoy keeps
    serving the certificate it has. The CA comes back: the renewal succeeds and Envoy serves the
    new one. The token file is removed: the next renewal goes over mTLS with the current
    certificate, and Envoy serves that one. Every request on the way is verified."""
    monkeypatch.setattr(workload, "failure_delay", lambda failures, draw: 0.2)  # quick retries
    caplog.set_level(logging.INFO, logger="pilotfish.controlplane")
    ca, agent, envoy = mesh
    envoy.wait_serving()
    port = envoy.listener_port()

    def serve_until(done: Callable[[int], bool]) -> int:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            serial, uris, said = handshake(port, ca.root_file)  # any failure fails the test
            assert uris == [ID] and said == b"hello from envoy\n"
            if done(serial):
                return serial
        raise AssertionError("not within 40 s")

    first = serve_until(lambda serial: True)
    ca.down = True
    serve_until(lambda serial: agent.identity.failures >= 2)  # renewals failed: the old one still serves
    assert serve_until(lambda serial: True) == first
    ca.down = False
    second = serve_until(lambda serial: serial != first)
    (tmp_path / "istio-token").unlink()
    serve_until(lambda serial: serial not in (first, second))
    assert "(client certificate)" in caplog.text  # the control plane's log: who asked, and how
