"""The status port under a flood from a remote peer, with the common container limit of 1024
open files that cannot be raised (`prlimit --nofile=1024:1024`).

Topology: the agent in a pod network namespace (10.79.0.2 on a veth), the flood and an honest
remote prober (think kubelet) in a peer namespace (10.79.0.1 and 10.79.0.3), so the status server
sees non-loopback peers. The test process makes its sockets inside either namespace from a
thread that entered it (a socket belongs to the namespace it was created in), so probes need no
subprocess each. The agent serves a saved name table (mesh names) and forwards other names to a
mock upstream in the pod namespace; there is no control plane (not needed here).

Before the bounds, ~1,100 idle connections from one peer (each kept up to 5 s) exhausted the
agent's file table: the local readiness probe and forwarded DNS failed, and every accept() retry
logged an EMFILE traceback.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from dnslib import DNSRecord
from procs import PILOTFISH, Process

from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dns"))
from mock_upstream import BING_ADDRESS, MockUpstream  # tests/dns's helper (a folder, not a package)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces and a veth pair")

POD_IP, FLOOD_IP, PROBER_IP = "10.79.0.2", "10.79.0.1", "10.79.0.3"
STATUS_PORT = 15020  # the pod namespace is ours alone: Istio's port is free there
FLOOD = 1100
SOFT_LIMIT = 1024
ROUNDS = 8

T = TypeVar("T")
_names = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def pod_and_peer() -> Iterator[tuple[str, str]]:
    base = f"pfa{os.getpid()}x{next(_names)}"
    pod, peer = base + "pod", base + "peer"
    ip("netns", "add", pod)
    ip("netns", "add", peer)
    try:
        ip("link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "eth0", "netns", peer)
        ip("-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        for address in (FLOOD_IP, PROBER_IP):
            ip("-n", peer, "addr", "add", f"{address}/24", "dev", "eth0")
        for ns in (pod, peer):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
        yield pod, peer
    finally:
        for ns in (pod, peer):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def in_netns(ns: str, make: Callable[[], T]) -> T:
    """`make()` run by a thread inside network namespace `ns` (setns is per thread)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            out.append(make())
        except BaseException as err:  # handed to the caller
            errors.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=30)
    if errors:
        raise errors[0]
    return out[0]


def http(ns: str, method: str, path: str, host: str = "127.0.0.1", source: str = "") -> int | None:
    """The status code of one request to the status port from inside `ns`, None on no answer."""
    sock = in_netns(ns, socket.socket)
    try:
        sock.settimeout(2)
        if source:
            sock.bind((source, 0))
        sock.connect((host, STATUS_PORT))
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        m = re.match(rb"HTTP/1\.1 (\d+)", reply)
        return int(m.group(1)) if m else None
    except OSError:
        return None
    finally:
        sock.close()


def dns(ns: str, port: int, name: str) -> list[str] | None:
    sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.settimeout(2)
        sock.sendto(DNSRecord.question(name).pack(), ("127.0.0.1", port))
        return [str(rr.rdata) for rr in DNSRecord.parse(sock.recv(65535)).rr]
    except OSError:
        return None
    finally:
        sock.close()


class Flood:
    """`count` idle connections from FLOOD_IP that never send a byte; the ones the server closes
    are opened again by `refill`, as a determined attacker would."""

    def __init__(self, peer: str, count: int) -> None:
        self.peer = peer
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self._open(count)

    def _open(self, count: int) -> None:
        def make() -> list[socket.socket]:
            return [socket.socket() for _ in range(count)]

        for sock in in_netns(self.peer, make):
            sock.setblocking(False)
            sock.bind((FLOOD_IP, 0))
            sock.connect_ex((POD_IP, STATUS_PORT))
            self.socks.append(sock)

    def refill(self) -> None:
        poller = select.poll()
        for sock in self.socks:
            poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        closed = {fd for fd, _ in poller.poll(0)}
        keep = [s for s in self.socks if s.fileno() not in closed]
        for sock in self.socks:
            if sock.fileno() in closed:
                sock.close()
        self.reopened += len(self.socks) - len(keep)
        missing = len(self.socks) - len(keep)
        self.socks = keep
        self._open(missing)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def more_files() -> Iterator[None]:
    """This process holds the flood: raise its own soft limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * FLOOD:
        pytest.skip(f"hard open-files limit {hard} is too low to hold the flood")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_remote_flood_leaves_local_probes_dns_and_remote_probers_served(tmp_path: Path, more_files: None) -> None:
    table = NameTable()
    table.table["productpage.ns1.svc.cluster.local"].ips.append("10.96.0.7")
    saved = tmp_path / "var/lib/pilotfish/nametable.pb"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(table.SerializeToString())
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch ns1.svc.cluster.local svc.cluster.local\n")
    with pod_and_peer() as (pod, peer):
        upstream = in_netns(pod, lambda: MockUpstream(host="127.0.0.1").start())
        env = {**os.environ, "POD_NAMESPACE": "ns1", "ISTIO_META_DNS_CAPTURE": "true",
               "PROXY_CONFIG": '{"controlPlaneAuthPolicy": "NONE"}', "PILOT_DISCOVERY_ADDRESS": "127.0.0.1:1"}
        agent = Process(["ip", "netns", "exec", pod, "prlimit", f"--nofile={SOFT_LIMIT}:{SOFT_LIMIT}",
                         PILOTFISH, "agent", "--listen", "127.0.0.1:0", "--status-port", str(STATUS_PORT),
                         "--resolv-conf", str(tmp_path / "resolv.conf"), "--upstream", f"127.0.0.1:{upstream.port}"],
                        tmp_path / "agent.log", env=env, cwd=tmp_path)
        flood: Flood | None = None
        try:
            dns_port = int(agent.wait_for(r"dns: listening udp 127\.0\.0\.1:(\d+)").group(1))
            agent.wait_for(rf"status: listening on port {STATUS_PORT}")
            assert http(pod, "GET", "/healthz/ready") == 200

            flood = Flood(peer, FLOOD)
            for round_ in range(ROUNDS):
                flood.refill()
                what = f"round {round_} of the flood"
                assert http(pod, "GET", "/healthz/ready") == 200, what
                assert http(peer, "GET", "/healthz/ready", host=POD_IP, source=PROBER_IP) == 200, what
                assert dns(pod, dns_port, "productpage.ns1.svc.cluster.local.") == ["10.96.0.7"], what
                assert dns(pod, dns_port, f"r{round_}.www.bing.com.") == [BING_ADDRESS], what  # a new forward
            assert http(peer, "POST", "/quitquitquit", host=POD_IP, source=PROBER_IP) == 403
            assert http(peer, "GET", "/debug/ndsz", host=POD_IP, source=PROBER_IP) == 403
            assert agent.proc.poll() is None
            metrics = in_netns(pod, lambda: _get_metrics())
            refused = re.search(r'pilotfish_status_connections_dropped_total\{reason="peer_limit"\} (\d+)', metrics)
            assert refused and int(refused.group(1)) >= FLOOD - 8, metrics
            print(f"flood connections opened again after the server closed them: {flood.reopened}; "
                  f"refused (peer limit): {refused.group(1)}")
            flood.close()
            flood = None
            assert http(pod, "POST", "/quitquitquit") == 200
            assert agent.proc.wait(timeout=10) == 0
        finally:
            if flood is not None:
                flood.close()
            agent.stop()
            upstream.stop()
    log = agent.text()
    assert "Traceback" not in log
    assert re.search(r"agent: open files limit 1024\b", log), log
    assert len(re.findall(r"status: refused", log)) <= 3, log  # once per interval, not per connection


def _get_metrics() -> str:
    """GET /stats/prometheus from loopback (called inside the pod namespace)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{STATUS_PORT}/stats/prometheus", timeout=5) as r:
        return r.read().decode()
