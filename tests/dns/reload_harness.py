"""A `pilotfish dns` process serving a table file, for the tests of what a reload does: the file
rewritten, SIGHUP sent, the log line waited for, the served answers checked with plain UDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord
from procs import PILOTFISH, Process

NS = "ns1"


def k8s(name: str, *ips: str, namespace: str = NS) -> dict[str, Any]:
    """One Kubernetes entry of a table file."""
    return {f"{name}.{namespace}.svc.cluster.local": {
        "ips": list(ips), "registry": "Kubernetes", "shortname": name, "namespace": namespace}}


def write_table(path: Path, text: str | dict[str, Any]) -> None:
    """Replace the file in one rename, as an operator's tooling would."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text if isinstance(text, str) else json.dumps({"table": text}))
    os.replace(tmp, path)


def query(port: int, name: str, timeout: float = 2.0) -> DNSRecord | None:
    """The reply to an A query over UDP, or None on timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(DNSRecord.question(name).pack(), ("127.0.0.1", port))
        try:
            return DNSRecord.parse(sock.recv(4096))
        except TimeoutError:
            return None


def address(reply: DNSRecord | None) -> str | None:
    """The first A record's address in a reply, or None (no reply, or no A record)."""
    if reply is None:
        return None
    return next((str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A), None)


class DnsProcess:
    """`pilotfish dns` on 127.0.0.1, an ephemeral port, table file `table`."""

    def __init__(self, tmp: Path, table: dict[str, Any], extra: list[str] | None = None) -> None:
        self.table = tmp / "table.json"
        write_table(self.table, table)
        resolv = tmp / "resolv.conf"
        resolv.write_text(f"nameserver 127.0.0.1\nsearch {NS}.svc.cluster.local svc.cluster.local cluster.local\n")
        self.proc = Process(
            [PILOTFISH, "dns", "--name-table", str(self.table), "--resolv-conf", str(resolv),
             "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--forward-timeout", "200ms",
             "--proxy-namespace", NS, *(extra or [])],
            tmp / "pilotfish.log",
        )
        self.port = int(self.proc.wait_for(r"listening udp 127\.0\.0\.1:(\d+)").group(1))

    def reload(self, table: str | dict[str, Any], timeout: float = 10.0) -> str:
        """Rewrite the file, send SIGHUP; the log line the reload ended with (installed or
        rejected)."""
        mark = len(self.proc.text())
        write_table(self.table, table)
        self.proc.proc.send_signal(signal.SIGHUP)
        return self.proc.wait_for(r"[^\n]*(name table installed|rejected name table)[^\n]*\n",
                                  timeout=timeout, after=mark).group(0)

    def answer(self, name: str) -> str | None:
        return address(query(self.port, name))

    def stop(self) -> str:
        """Stop it; the whole log (the caller checks it holds no traceback)."""
        assert self.proc.stop() == 0, self.proc.text()
        return self.proc.text()


@contextmanager
def dns_process(tmp: Path, table: dict[str, Any], extra: list[str] | None = None) -> Iterator[DnsProcess]:
    proc = DnsProcess(tmp, table, extra)
    try:
        yield proc
    finally:
        log = proc.stop()
    assert "Traceback" not in log, log


def wait_until(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())
