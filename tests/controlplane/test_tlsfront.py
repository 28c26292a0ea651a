"""The control plane's TLS front under hostile clients (a hostile review locked every agent out
with 2,048 idle connections from one address): one address holds at most MAX_PER_SOURCE
connections, and a connection that completes its handshake but sends nothing is closed."""

from __future__ import annotations

import socket
import ssl
import time
from datetime import timedelta
from pathlib import Path

import pytest
from ca_harness import Ca

from pilotfish.controlplane import tlsfront

pytestmark = pytest.mark.timeout(30)


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock` (a clean EOF, a reset, or TLS ended without close_notify)."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_one_address_holds_at_most_its_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsfront, "MAX_PER_SOURCE", 2)
    ca = Ca(tmp_path, timedelta(hours=1))
    held = [socket.create_connection(("127.0.0.1", ca.port), timeout=5) for _ in range(2)]  # no handshake
    try:
        wait_until(lambda: ca.front.connections == 2, "two connections held")
        with socket.create_connection(("127.0.0.1", ca.port), timeout=5) as third:
            assert closed(third)  # closed at once
        assert ca.front.refused == 1
    finally:
        for sock in held:
            sock.close()
        ca.stop()


def test_a_connection_that_sends_nothing_after_its_handshake_is_closed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tlsfront, "FIRST_BYTES_TIMEOUT", 0.2)
    ca = Ca(tmp_path, timedelta(hours=1))
    try:
        context = ssl.create_default_context(cafile=str(ca.root_file))
        context.check_hostname = False
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", ca.port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                assert closed(tls)  # closed by the front, nothing relayed
        wait_until(lambda: ca.front.connections == 0, "the slot given back")
    finally:
        ca.stop()
