"""`pilotfish agent` against `pilotfish controlplane`, both real processes, over TLS on loopback:
the table arrives and dig answers; changes are pushed; the agent rides out a control plane that
goes away and comes back, a table that does not decode, a restart without a control plane, and
a wrong token or root (it keeps retrying and stays not ready)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from dnslib import DNSRecord
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.any_pb2 import Any
from procs import PILOTFISH, Process

from pilotfish.controlplane.ca import cert_pem, issue_serving, key_pem, new_key, new_root, serving_names
from pilotfish.controlplane.casvc import CertificateService, parse_identities
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

NDS = "type.googleapis.com/istio.networking.nds.v1.NameTable"
DIG = shutil.which("dig")
IDENTITY_TOKENS = ("world-token", "the-right-token")  # the tokens the agent sends in these tests

MESH = """
services:
  - name: productpage
    namespace: ns1
    clusterIPs: [10.96.0.7]
    ports: [9080]
"""
MORE = MESH + """
  - name: reviews
    namespace: ns1
    clusterIPs: [10.96.0.8]
    ports: [9080]
"""


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def query(port: int, name: str, timeout: float = 1.0) -> tuple[int, list[str]] | None:
    """(rcode, answers) from the agent's DNS proxy, or None without a reply."""
    try:
        raw = DNSRecord.question(name).send("127.0.0.1", port, timeout=timeout)
    except (TimeoutError, OSError):
        return None
    reply = DNSRecord.parse(raw)
    return reply.header.rcode, [str(rr.rdata) for rr in reply.rr]


def wait_answer(port: int, name: str, want: list[str], timeout: float) -> float:
    """Seconds until `name` resolves to `want`; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        got = query(port, name, timeout=0.2)
        if got is not None and got[1] == want:
            return time.monotonic() - started
        time.sleep(0.01)
    raise AssertionError(f"{name} did not resolve to {want} within {timeout}s (last: {got})")


def wait_ready(port: int, timeout: float = 10.0) -> None:
    """Until /healthz/ready says 200: the certificate comes from the CA a moment after the table."""
    wait_until(lambda: readiness(port)[0] == 200, timeout, f"readiness 200 (last: {readiness(port)})")


def readiness(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class World:
    """A control plane and an agent in their own directories (the agent's relative paths, like
    ./var/run/secrets/istio/root-cert.pem, live under its working directory).

    Ports are the kernel's pick, read back: the control plane's from its log (a restarted one
    binds the port it had, which the agent keeps dialling), the status server's from the
    agent's (`--status-listen 127.0.0.1:0`)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.mesh.write_text(MESH)
        self.cp_port = 0  # until a control plane has bound one
        self.agent_dir = tmp / "agent"
        self.root = self.agent_dir / "var/run/secrets/istio/root-cert.pem"
        self.token = self.agent_dir / "var/run/secrets/tokens/istio-token"
        self.token.parent.mkdir(parents=True)
        self.token.write_text("world-token\n")
        self.identities = tmp / "identities"  # the tokens the control plane's CA knows, and whose they are
        self.identities.write_text("\n".join(f"{token} ns1/productpage" for token in IDENTITY_TOKENS) + "\n")
        (tmp / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\n")
        self.cp: Process | None = None
        self.agent: Process | None = None
        self.dns_port = self.status_port = 0

    def start_cp(self, *extra: str) -> Process:
        log = self.tmp / "cp.log"
        offset = log.stat().st_size if log.exists() else 0
        self.cp = Process(
            [PILOTFISH, "controlplane", "--mesh", str(self.mesh), "--listen", f"127.0.0.1:{self.cp_port}",
             "--state-dir", str(self.tmp / "cp-state"), "--root-cert-out", str(self.root),
             "--identities", str(self.identities), *extra],
            log,
        )
        self.cp_port = int(self.cp.wait_for(r"controlplane: listening on 127\.0\.0\.1:(\d+)", after=offset).group(1))
        return self.cp

    def start_agent(self) -> Process:
        assert self.cp_port, "start a control plane first: the agent dials its port"
        env = {**os.environ, "POD_NAME": "productpage-v1", "POD_NAMESPACE": "ns1", "INSTANCE_IP": "10.1.0.5",
               "SERVICE_ACCOUNT": "productpage", "ECC_SIGNATURE_ALGORITHM": "ECDSA",
               "ISTIO_META_DNS_CAPTURE": "true", "ISTIO_META_CLUSTER_ID": "Kubernetes",
               "PILOT_DISCOVERY_ADDRESS": f"localhost:{self.cp_port}"}
        log = self.tmp / "agent.log"
        offset = log.stat().st_size if log.exists() else 0
        self.agent = Process(
            [PILOTFISH, "agent", "proxy", "sidecar", "--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0",
             "--resolv-conf", str(self.tmp / "resolv.conf")],
            log, env=env, cwd=self.agent_dir,
        )
        self.dns_port = int(self.agent.wait_for(r"dns: listening udp 127\.0\.0\.1:(\d+)", after=offset).group(1))
        self.status_port = int(self.agent.wait_for(r"status: listening on port (\d+)", after=offset).group(1))
        return self.agent

    def run_then_stop(self) -> Path:
        """Control plane and agent until the table answers, then both stopped (the agent with
        exit 0); the path of the table the agent saved."""
        cp = self.start_cp()
        agent = self.start_agent()
        wait_answer(self.dns_port, "productpage", ["10.96.0.7"], timeout=10)
        saved = self.agent_dir / "var/lib/istio/data/nametable.pb"
        wait_until(saved.exists, 10, "the table saved")  # it serves first, then it is saved
        assert agent.stop() == 0
        cp.stop()
        return saved

    def stop(self) -> None:
        for proc in (self.agent, self.cp):
            if proc is not None:
                proc.stop()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.stop()


def test_table_arrives_over_tls_and_dig_answers(world: World) -> None:
    world.start_cp()
    agent = world.start_agent()
    wait_answer(world.dns_port, "productpage.ns1.svc.cluster.local", ["10.96.0.7"], timeout=10)
    if DIG:
        out = subprocess.run([DIG, "@127.0.0.1", "-p", str(world.dns_port), "+short", "productpage"],
                             capture_output=True, text=True, timeout=10, check=False).stdout.split()
        assert out == ["10.96.0.7"]
    wait_ready(world.status_port)
    assert readiness(world.status_port) == (200, "")
    agent.wait_for(r"xds: accepted type\.googleapis\.com/istio\.networking\.nds\.v1\.NameTable")
    assert world.cp is not None
    world.cp.wait_for(r"accepted NDS version")
    with urllib.request.urlopen(f"http://127.0.0.1:{world.status_port}/debug/ndsz", timeout=2) as r:
        assert "productpage.ns1.svc.cluster.local" in json.loads(r.read())["table"]
    with urllib.request.urlopen(f"http://127.0.0.1:{world.status_port}/stats/prometheus", timeout=2) as r:
        metrics = r.read().decode()
    assert "pilotfish_xds_connected 1.0" in metrics
    assert f'pilotfish_xds_accepted_total{{type_url="{NDS}"}} 1.0' in metrics
    assert f'pilotfish_xds_rejected_total{{type_url="{NDS}"}} 0.0' in metrics
    assert "pilotfish_xds_last_update_timestamp_seconds 1." in metrics  # a Unix time, not 0
    assert "istio_agent_dns_requests_total" in metrics


def test_mesh_change_is_answered(world: World) -> None:
    """The control plane notices the file change and pushes; the agent answers the new name.
    How fast is measured, not asserted here (no wall-clock assertions): the figure is printed."""
    world.start_cp()
    world.start_agent()
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
    write_atomically(world.mesh, MORE)
    elapsed = wait_answer(world.dns_port, "reviews", ["10.96.0.8"], timeout=10)
    print(f"mesh file change answered by the agent after {elapsed * 1000:.0f} ms")


def test_control_plane_away_then_back(world: World) -> None:
    cp = world.start_cp()
    agent = world.start_agent()
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
    wait_ready(world.status_port)  # the table and the certificate held
    cp.stop(signal_kill())
    agent.wait_for(r"xds: connection to .* ended")
    for _ in range(5):  # the last table keeps serving, and the agent stays ready
        assert query(world.dns_port, "productpage") == (0, ["10.96.0.7"])
        time.sleep(0.1)
    assert readiness(world.status_port)[0] == 200
    write_atomically(world.mesh, MORE)
    world.start_cp()
    wait_answer(world.dns_port, "reviews", ["10.96.0.8"], timeout=40)
    assert agent.text().count("xds: connected to") >= 2


def signal_kill() -> int:
    import signal

    return signal.SIGKILL


GARBAGE = Any(type_url=NDS, value=b"\x0a\x05\x0a\x03\xff\xfe")  # no NameTable


def _poisoned() -> Any:
    """A NameTable that decodes but does not build: an IP with a NUL byte (inet_pton's
    ValueError), next to a changed address that must not be served either."""
    table = NameTable()
    table.table["productpage.ns1.svc.cluster.local"].ips.append("10.96.0.9")
    table.table["reviews.ns1.svc.cluster.local"].ips.append("10.96.0.8\x00")
    packed = Any()
    packed.Pack(table)
    return packed


def _good_table() -> Any:
    good = NameTable()
    entry = good.table["productpage.ns1.svc.cluster.local"]
    entry.ips.append("10.96.0.7")
    entry.registry, entry.shortname, entry.namespace = "Kubernetes", "productpage", "ns1"
    packed = Any()
    packed.Pack(good)
    return packed


class _ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A misbehaving control plane: a good table (v1), then `second` (v2) once v1 is ACKed."""

    def __init__(self, second: Any) -> None:
        self.second = second
        self.nacks: list[discovery_pb2.DiscoveryRequest] = []
        self.acks: list[str] = []

    def StreamAggregatedResources(self, requests, context):  # type: ignore[no-untyped-def]
        for request in requests:
            if request.HasField("error_detail"):
                self.nacks.append(request)
            elif not request.response_nonce:
                yield discovery_pb2.DiscoveryResponse(type_url=NDS, version_info="v1", nonce=uuid.uuid4().hex,
                                                      resources=[_good_table()])
            else:
                self.acks.append(request.version_info)
                yield discovery_pb2.DiscoveryResponse(type_url=NDS, version_info="v2", nonce=uuid.uuid4().hex,
                                                      resources=[self.second])


class _HangsUpAfterEachTable(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A control plane that delivers a table on every stream and, once it is ACKed, ends the
    stream with UNAVAILABLE, as a restarting istiod does; it notes when each stream started and
    ended (time.monotonic)."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.ended: list[float] = []

    def StreamAggregatedResources(self, requests, context):  # type: ignore[no-untyped-def]
        self.started.append(time.monotonic())
        next(requests)
        yield discovery_pb2.DiscoveryResponse(type_url=NDS, version_info="v1", nonce=uuid.uuid4().hex,
                                              resources=[_good_table()])
        next(requests)  # the ACK
        self.ended.append(time.monotonic())
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


def _serve_scripted(world: World, servicer: ads_pb2_grpc.AggregatedDiscoveryServiceServicer) -> grpc.Server:
    """`servicer` over TLS on a port of its own, with a root the agent trusts."""
    now = datetime.now(UTC)
    ca = new_root(new_key(), now)
    key = new_key()
    credentials = grpc.ssl_server_credentials([(key_pem(key), cert_pem(issue_serving(ca, key, serving_names(), now)))])
    world.root.parent.mkdir(parents=True, exist_ok=True)
    world.root.write_bytes(cert_pem(ca.cert))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    certificates = CertificateService(ca, lambda: parse_identities(world.identities.read_text(), "cluster.local"),
                                      timedelta(hours=24))
    server.add_generic_rpc_handlers((certificates.handler(),))  # as istiod's 15012: the agent's CA too
    world.cp_port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server


def test_undecodable_table_is_nacked_and_the_old_one_stays(world: World) -> None:
    servicer = _ScriptedAds(GARBAGE)
    server = _serve_scripted(world, servicer)
    try:
        agent = world.start_agent()
        wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
        wait_until(lambda: servicer.nacks, 10, "a NACK of v2")
        nack = servicer.nacks[0]
        assert nack.error_detail.code == 13 and "cannot decode" in nack.error_detail.message
        assert nack.version_info == "v1" and servicer.acks == ["v1"]
        agent.wait_for(r"WARNING\s+xds: rejected .*NameTable version 'v2': cannot decode")
        assert query(world.dns_port, "productpage") == (0, ["10.96.0.7"])
        wait_ready(world.status_port)
    finally:
        server.stop(0)


def test_table_that_does_not_build_is_nacked_the_old_one_serves_and_stays_saved(world: World) -> None:
    """A pushed table whose entry inet_pton refuses used to be saved first and then crash the
    agent, so every restart crashed on the saved copy. Now: NACK with the error, the old table
    keeps answering, the saved file is untouched, the agent runs on."""
    servicer = _ScriptedAds(_poisoned())
    server = _serve_scripted(world, servicer)
    try:
        agent = world.start_agent()
        wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
        saved = world.agent_dir / "var/lib/istio/data/nametable.pb"
        wait_until(saved.exists, 10, "the v1 table saved")
        saved_v1 = saved.read_bytes()
        wait_until(lambda: servicer.nacks, 10, "a NACK of v2")
        nack = servicer.nacks[0]
        assert nack.error_detail.code == 13 and nack.error_detail.message
        assert nack.version_info == "v1" and servicer.acks == ["v1"]
        agent.wait_for(r"WARNING\s+xds: rejected .*NameTable version 'v2': ")
        assert query(world.dns_port, "productpage") == (0, ["10.96.0.7"])
        assert query(world.dns_port, "reviews.ns1.svc.cluster.local")[1] == []  # not from v2
        wait_ready(world.status_port)
        assert saved.read_bytes() == saved_v1
        with urllib.request.urlopen(f"http://127.0.0.1:{world.status_port}/stats/prometheus", timeout=2) as r:
            assert f'pilotfish_xds_rejected_total{{type_url="{NDS}"}} 1.0' in r.read().decode()
        assert world.agent is not None and world.agent.proc.poll() is None
        assert "Traceback" not in agent.text()
    finally:
        server.stop(0)


@pytest.mark.parametrize("saved", [GARBAGE.value, _poisoned().value], ids=["undecodable", "poisoned"])
def test_saved_table_that_does_not_load_is_moved_aside_at_start(world: World, saved: bytes) -> None:
    path = world.agent_dir / "var/lib/istio/data/nametable.pb"
    path.parent.mkdir(parents=True)
    path.write_bytes(saved)
    world.start_cp()
    agent = world.start_agent()
    agent.wait_for(r"WARNING\s+xds: the saved name table .*nametable\.pb does not load .*moved to .*nametable\.pb\.bad")
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)  # from the control plane
    assert path.with_name("nametable.pb.bad").read_bytes() == saved
    wait_until(lambda: path.exists() and path.read_bytes() != saved, 10, "the control plane's table saved")
    assert "Traceback" not in agent.text()


def test_temp_file_of_an_interrupted_save_is_removed_at_start(world: World) -> None:
    """A save killed between writing its temp file and the rename (SIGKILL, OOM) leaves the temp
    file behind; the next start removes it, and the saved table still serves."""
    directory = world.run_then_stop().parent
    fd, left = tempfile.mkstemp(prefix=".nametable.pb.", dir=directory)  # what the save makes first
    os.write(fd, (directory / "nametable.pb").read_bytes()[:10])
    os.close(fd)
    world.start_agent()
    assert query(world.dns_port, "productpage") == (0, ["10.96.0.7"])
    assert not os.path.exists(left)
    assert sorted(p.name for p in directory.iterdir()) == ["nametable.pb"]


def test_restart_without_control_plane_serves_the_saved_table(world: World) -> None:
    saved = world.run_then_stop()
    assert saved.exists() and (saved.stat().st_mode & 0o777) == 0o600
    agent = world.start_agent()
    assert query(world.dns_port, "productpage") == (0, ["10.96.0.7"])  # at once, no control plane
    agent.wait_for(r"serving the saved name table")
    # the certificate is not kept on disk (without OUTPUT_CERTS): not ready until the CA is back
    assert readiness(world.status_port) == (503, "no workload certificate yet")
    world.start_cp()
    wait_ready(world.status_port)


def test_wrong_token_is_logged_retried_and_not_ready(world: World) -> None:
    token = world.tmp / "cp-token"
    token.write_text("the-right-token\n")
    world.token.write_text("a-wrong-token\n")
    world.start_cp("--token-file", str(token))
    agent = world.start_agent()
    agent.wait_for(r"UNAUTHENTICATED.*retrying in", timeout=10)
    agent.wait_for(r"(?s)UNAUTHENTICATED.*retrying in.*UNAUTHENTICATED.*retrying in", timeout=15)
    status, body = readiness(world.status_port)
    assert status == 503 and body == "no workload certificate yet"  # the CA refused the token too
    world.token.write_text("the-right-token\n")  # re-read on the next attempt
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=40)
    wait_ready(world.status_port, timeout=60)  # the CA's retries back off (a few seconds after a few)


def test_wrong_root_is_logged_retried_and_not_ready(world: World) -> None:
    world.start_cp()
    other = new_root(new_key(), datetime.now(UTC), common_name="someone else's root")
    world.root.write_bytes(cert_pem(other.cert))  # after the control plane wrote the real one
    agent = world.start_agent()
    agent.wait_for(r"(?s)UNAVAILABLE.*retrying in.*UNAVAILABLE.*retrying in", timeout=15)
    assert readiness(world.status_port)[0] == 503
    assert query(world.dns_port, "productpage", timeout=0.5) == (2, [])  # SERVFAIL: no table yet


def test_sigterm_drops_readiness_and_exits_zero(world: World) -> None:
    world.start_cp()
    agent = world.start_agent()
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
    assert agent.stop() == 0  # within stop()'s bound: a stop that hangs fails there
    agent.wait_for(r"received signal: SIGTERM, shutting down")


def test_quitquitquit_stops_the_agent(world: World) -> None:
    """POST /quitquitquit (status requests are handled off the trio loop) is answered 200 OK, as
    pilot-agent does, and stops the agent, exit 0."""
    world.start_cp()
    agent = world.start_agent()
    wait_answer(world.dns_port, "productpage", ["10.96.0.7"], timeout=10)
    request = urllib.request.Request(f"http://127.0.0.1:{world.status_port}/quitquitquit", method="POST")
    with urllib.request.urlopen(request, timeout=5) as r:
        assert (r.status, r.read()) == (200, b"OK")
    assert agent.proc.wait(timeout=5) == 0
    agent.wait_for(r"agent: quitquitquit, shutting down")


def test_json_logs(world: World, tmp_path: Path) -> None:
    world.start_cp()
    env = {**os.environ, "POD_NAMESPACE": "ns1", "ISTIO_META_DNS_CAPTURE": "true",
           "PILOT_DISCOVERY_ADDRESS": f"localhost:{world.cp_port}"}
    proc = Process([PILOTFISH, "agent", "--log-format", "json", "--listen", "127.0.0.1:0", "--status-port", "0",
                    "--resolv-conf", str(world.tmp / "resolv.conf")], tmp_path / "json.log", env=env, cwd=world.agent_dir)
    try:
        proc.wait_for(r'"msg": "xds: accepted')
    finally:
        proc.stop()
    lines = [json.loads(line) for line in proc.text().splitlines() if line.strip()]
    assert all({"time", "level", "scope", "msg"} <= set(line) for line in lines)
    assert any(line["scope"] == "xds" and line["level"] == "info" for line in lines)


def test_backoff_resets_after_every_stream_that_delivered(world: World) -> None:
    """Every stream delivers a table and then ends with UNAVAILABLE (a restarting istiod). The
    wait before the next stream, timed on the control plane's side, stays near the base (0.5 s,
    jittered) however many such streams there were; it used to grow as if the healthy streams
    had failed (ceilings 0.5, 1, 2, 4, 8, ... s: 15.7 s, 20.9 s, ... seen)."""
    servicer = _HangsUpAfterEachTable()
    server = _serve_scripted(world, servicer)
    try:
        world.start_agent()
        for gap in range(8):
            wait_until(lambda gap=gap: len(servicer.ended) > gap, 10, f"stream {gap} delivered and ended")
            wait_until(lambda gap=gap: len(servicer.started) > gap + 1, 2.0,  # generous: the base is 0.5 s
                       f"stream {gap + 1} within 2 s of the end of stream {gap} (waits so far: {_gaps(servicer)})")
        print(f"waits between streams: {_gaps(servicer)}")
    finally:
        server.stop(0)


def _gaps(servicer: _HangsUpAfterEachTable) -> list[float]:
    return [round(start - end, 2) for end, start in zip(servicer.ended, servicer.started[1:])]
