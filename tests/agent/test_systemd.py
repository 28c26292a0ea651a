"""The agent under systemd's notify protocol (agent/parts.py SystemdPart, common/systemd.py), as a
real process with a real datagram socket standing for systemd: STATUS while it is not ready,
READY=1 once it is, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from procs import PILOTFISH, Process
from sds_client import issued

from pilotfish.common.systemd import message, notify_address, watchdog_interval


def test_protocol_details() -> None:
    assert notify_address({"NOTIFY_SOCKET": "@sd"}) == "\0sd"
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({}) is None and notify_address({"NOTIFY_SOCKET": "relative"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({}, 7) is None
    assert message(READY="1", STATUS="a\nb") == b"READY=1\nSTATUS=a b\n"


@pytest.mark.timeout(60)
def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    certs = tmp_path / "etc/certs"  # a mounted certificate: ready as soon as it loads
    certs.mkdir(parents=True)
    cert = issued()
    (certs / "cert-chain.pem").write_bytes(cert.chain_pem)
    (certs / "key.pem").write_bytes(cert.key_pem)
    (certs / "root-cert.pem").write_bytes(cert.root_pem)
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(20)
    env = {**os.environ, "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}', "CA_ROOT_CA": "SYSTEM",
           "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    agent = Process([PILOTFISH, "agent", "--status-port", "0"], tmp_path / "agent.log", env=env, cwd=tmp_path)
    try:
        got: list[bytes] = []
        while not any(m.startswith(b"READY=1") for m in got):  # STATUS lines may come first
            got.append(systemd.recv(4096))
        pings = 0
        while pings < 3:  # at 0.1 s each: the loop keeps pinging after READY
            pings += systemd.recv(4096) == b"WATCHDOG=1\n"
    finally:
        assert agent.stop() == 0
    rest = []
    while not rest or rest[-1] != b"STOPPING=1\n":
        rest.append(systemd.recv(4096))
    assert any(m.startswith(b"READY=1\nSTATUS=ready") for m in got), got
    systemd.close()
