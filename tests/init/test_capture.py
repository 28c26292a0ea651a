"""``pilotfish init`` in real network namespaces: does the kernel route traffic where Istio would?

Rule-text goldens can say that the right lines were generated; only real traffic says that
they work together (owner matches, REDIRECT/TPROXY targets, DNS conntrack zones, the order of
RETURNs). So every test builds a pod/peer namespace pair (see ``netns.py``), runs the real
``pilotfish init`` inside the pod namespace with ``ip netns exec``, and then sends traffic as
specific uids and looks at which socket received it and what ``SO_ORIGINAL_DST`` said.

Every test runs for both iptables backends (``legacy`` and ``nft``): users hit "rules went into
the wrong backend" more than any other capture bug (docs/init.md "Backends"), and the backends
differ in subtle ways (nft needs no lock, legacy tables appear on first use).

The whole module needs root and ``ip netns``; it is skipped with the reason otherwise, and also
while the ``init`` subcommand does not exist yet.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import netns as N
from netns import (APP_UID, BACKENDS, PEER_V4, PEER_V6, POD_V4, POD_V6, PROXY_UID, SVC_V4, SVC_V6,
                   Snapshot, Topology)

# The injection template's istio-init arguments (docs/istio-compat.md "istio-iptables configuration"),
# in template order.
SIDECAR_FLAGS: dict[str, str] = {
    "-p": "15001", "-z": "15006", "-u": "1337", "-m": "REDIRECT",
    "-i": "*", "-x": "", "-b": "*", "-d": "15090,15021,15020",
}
AGENT_DNS_ANSWER_V4, UPSTREAM_DNS_ANSWER_V4 = "192.0.2.53", "198.51.100.53"
AGENT_DNS_ANSWER_V6, UPSTREAM_DNS_ANSWER_V6 = "2001:db8::53", "2001:db8::99"

# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def _environment() -> None:
    """Skip the module with a clear reason where it cannot run; tidy up after crashed runs."""
    reason = N.skip_reason()
    if reason:
        pytest.skip(reason)
    N.reap_stale_namespaces()
    reason = N.init_missing_reason()
    if reason:
        pytest.skip(reason)


_backend_reasons: dict[str, str | None] = {}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The iptables backend under test, skipped if its binaries or kernel support are missing.

    Module-scoped so that the shared "rules installed" namespaces below are built once per
    backend rather than once per test.
    """
    name: str = request.param
    if name not in _backend_reasons:
        _backend_reasons[name] = N.backend_skip_reason(name)
    reason = _backend_reasons[name]
    if reason:
        pytest.skip(reason)
    return name


@pytest.fixture
def topo() -> Iterator[Topology]:
    """A fresh pod/peer namespace pair, deleted after the test whatever happens."""
    with N.topology() as t:
        yield t


@pytest.fixture(scope="module")
def resolv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resolv")


def write_resolv(directory: Path, *servers: str) -> Path:
    """A resolv.conf for ``--resolv-conf``: DNS capture is per nameserver (docs/istio-compat.md
    "istio-iptables rules")."""
    path = directory / ("resolv-" + "-".join(s.replace(":", "_") for s in servers) + ".conf")
    path.write_text("".join(f"nameserver {s}\n" for s in servers) + "search default.svc.cluster.local\n")
    return path


# --------------------------------------------------------------------------------------------
# Running pilotfish init


def flag_list(flags: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in flags.items():
        out += [key, value]
    return out


def sidecar_args(backend: str, resolv: Path | None, *, ipv6: str = "off",
                 overrides: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The template flags plus DNS capture, an explicit backend and IPv6 choice."""
    flags = dict(SIDECAR_FLAGS)
    flags.update(overrides or {})
    args = flag_list(flags)
    if resolv is not None:
        args += ["--redirect-dns", "--resolv-conf", str(resolv)]
    return args + ["--iptables-backend", backend, "--ipv6", ipv6, *extra]


def pilotfish_init(topo: Topology, args: list[str], *, ns: str | None = None, uid: int | None = None,
                   gid: int | None = None, subcommand: tuple[str, ...] = ("init",),
                   timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``pilotfish init ARGS`` inside the pod namespace (never checked: tests assert rc)."""
    return topo.run(ns or topo.pod, [N.pilotfish_bin(), *subcommand, *args], uid=uid, gid=gid,
                    timeout=timeout, check=False)


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return (f"\n$ {shlex.join(proc.args)}\nexit {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}")


def init_ok(topo: Topology, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = pilotfish_init(topo, args, **kw)
    assert proc.returncode == 0, "pilotfish init failed" + describe(proc)
    return proc


@pytest.fixture(scope="module")
def redirect_pod(backend: str, resolv_dir: Path) -> Iterator[Topology]:
    """A pod with the default sidecar rules plus DNS capture, IPv4 only (shared, read-only).

    The traffic tests 1-4 only send packets, they never change rules, so one installation per
    backend serves them all.
    """
    with N.topology() as t:
        init_ok(t, sidecar_args(backend, write_resolv(resolv_dir, PEER_V4), ipv6="off"))
        yield t


@pytest.fixture(scope="module")
def redirect_pod_v6(backend: str, resolv_dir: Path) -> Iterator[Topology]:
    """Same as ``redirect_pod`` with ``--ipv6 on`` and a v4 and a v6 nameserver."""
    with N.topology() as t:
        init_ok(t, sidecar_args(backend, write_resolv(resolv_dir, PEER_V4, PEER_V6), ipv6="on"))
        yield t


@pytest.fixture
def listeners(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stop the probes a test started on a *shared* topology, so the next test can bind again."""
    yield
    for name in ("redirect_pod", "redirect_pod_v6"):
        if name in request.fixturenames:
            request.getfixturevalue(name).stop_procs()


# --------------------------------------------------------------------------------------------
# Assertion helpers


def query_event(proto: str) -> Callable[[dict[str, Any]], bool]:
    """Predicate for a DNS listener's record of a query received over ``proto``."""
    return lambda e: e.get("event") == "query" and e.get("proto") == proto


def assert_tables(actual: Snapshot, expected: Snapshot, what: str,
                  proc: subprocess.CompletedProcess[str] | None = None) -> None:
    """Fail with a unified diff (expected → actual) and the command's output, not two dumps."""
    if actual != expected:
        pytest.fail(f"{what}:\n{N.snapshot_diff(expected, actual)}" + (describe(proc) if proc else ""),
                    pytrace=False)


def assert_reached(result: dict[str, Any], tag: str, what: str) -> dict[str, Any]:
    """The client succeeded and the listener tagged ``tag`` answered it; return what it saw."""
    assert result.get("ok"), f"{what}: connection failed: {result}"
    reply = result["reply"]
    assert reply["tag"] == tag, f"{what}: answered by {reply['tag']!r}, expected {tag!r}: {result}"
    return reply


def assert_dns(result: dict[str, Any], answer: str, server: str, what: str) -> None:
    """The query was answered with ``answer`` (identifies the server) and the reply appeared to
    come from the address the client asked, i.e. the NAT was undone for the reply too."""
    assert result.get("ok"), f"{what}: query failed: {result}"
    assert result["answer"] == answer, f"{what}: answered by the wrong server: {result}"
    assert result["reply_from"] == server, f"{what}: reply not from {server}: {result}"


# --------------------------------------------------------------------------------------------
# 1-4: default sidecar capture, IPv4


def test_rules_land_in_requested_backend_only(backend: str, redirect_pod: Topology) -> None:
    """The rules are in the requested backend and nowhere else; no v6 rules with --ipv6 off.

    A rule set in the "other" backend is the classic silent failure (docs/init.md "Backends"): the
    tables look fine in one tool while the kernel evaluates the other.
    """
    snap = redirect_pod.snapshot(backend)
    for rule in ("-A OUTPUT -j ISTIO_OUTPUT", "-A PREROUTING -p tcp -j ISTIO_INBOUND",
                 "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                 "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"):
        assert snap.has(rule), f"{rule!r} missing from {backend}:\n{snap}"
    assert "ISTIO_OUTPUT_DNS" in snap.v4, f"no DNS capture chain in {backend}:\n{snap}"
    assert not snap.v6, f"--ipv6 off but ip6tables-{backend} has rules:\n{snap.v6}"
    other = "nft" if backend == "legacy" else "legacy"
    if N.backend_skip_reason(other) is None:
        other_snap = redirect_pod.snapshot(other)
        assert other_snap.empty, f"--iptables-backend {backend} but {other} has rules:\n{other_snap}"


def test_outbound_tcp_redirected_to_15001(backend: str, redirect_pod: Topology, listeners: None) -> None:
    """1. App (uid 1000) → service VIP: lands on the outbound listener with the VIP as
    SO_ORIGINAL_DST, which is how Envoy picks the cluster."""
    t = redirect_pod
    t.tcp_listener(t.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    t.tcp_listener(t.peer, SVC_V4, 80, uid=0, tag="service")
    seen = assert_reached(t.tcp_connect(t.pod, SVC_V4, 80, uid=APP_UID), "outbound", "uid 1000 → VIP:80")
    assert seen["orig_dst"] == f"{SVC_V4}:80", seen
    assert seen["local"] == "127.0.0.1:15001", seen


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_redirected_to_15053(backend: str, redirect_pod: Topology, listeners: None, proto: str) -> None:
    """2. App DNS to the resolv.conf server lands on the agent's DNS port 15053, over UDP and TCP,
    and the reply looks as if it came from the server (the conntrack zones keep the NAT
    mapping of the app's flow apart from the agent's upstream flow)."""
    t = redirect_pod
    agent = t.dns_listener(t.pod, "127.0.0.1", 15053, AGENT_DNS_ANSWER_V4, uid=PROXY_UID, tag="agent")
    t.dns_listener(t.peer, PEER_V4, 53, UPSTREAM_DNS_ANSWER_V4, uid=0, tag="upstream")
    res = t.dns_query(t.pod, PEER_V4, uid=APP_UID, proto=proto)
    assert_dns(res, AGENT_DNS_ANSWER_V4, f"{PEER_V4}:53", f"{proto} DNS from uid 1000")
    q = agent.wait_event(query_event(proto))
    if proto == "tcp":
        assert q["orig_dst"] == f"{PEER_V4}:53", q


def test_proxy_uid_traffic_not_redirected(backend: str, redirect_pod: Topology, listeners: None) -> None:
    """3. The proxy's own traffic (uid 1337) must reach the real destination, or Envoy and the
    DNS proxy would loop into themselves. The capture listeners are up, so a wrong redirect
    would be *answered by them* rather than merely fail."""
    t = redirect_pod
    t.tcp_listener(t.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    t.dns_listener(t.pod, "127.0.0.1", 15053, AGENT_DNS_ANSWER_V4, uid=PROXY_UID, tag="agent")
    t.tcp_listener(t.peer, SVC_V4, 80, uid=0, tag="service")
    upstream = t.dns_listener(t.peer, PEER_V4, 53, UPSTREAM_DNS_ANSWER_V4, uid=0, tag="upstream")
    seen = assert_reached(t.tcp_connect(t.pod, SVC_V4, 80, uid=PROXY_UID), "service", "uid 1337 → VIP:80")
    assert seen["peer"].startswith(f"{POD_V4}:"), seen
    for proto in ("udp", "tcp"):
        res = t.dns_query(t.pod, PEER_V4, uid=PROXY_UID, proto=proto)
        assert_dns(res, UPSTREAM_DNS_ANSWER_V4, f"{PEER_V4}:53", f"{proto} DNS from uid 1337")
        upstream.wait_event(query_event(proto))


def test_inbound_redirected_to_15006_except_excluded_ports(backend: str, redirect_pod: Topology,
                                                            listeners: None) -> None:
    """4. Inbound to an application port lands on 15006 with the original port recoverable;
    an excluded port (-d, here the health port 15021) and the HBONE tunnel port 15008 (always
    exempt) reach their own listeners untouched."""
    t = redirect_pod
    t.tcp_listener(t.pod, "0.0.0.0", 15006, uid=PROXY_UID, tag="inbound")
    t.tcp_listener(t.pod, "0.0.0.0", 15021, uid=PROXY_UID, tag="health")
    t.tcp_listener(t.pod, "0.0.0.0", 15008, uid=PROXY_UID, tag="tunnel")
    seen = assert_reached(t.tcp_connect(t.peer, POD_V4, 8080, uid=0), "inbound", "peer → pod:8080")
    assert seen["orig_dst"] == f"{POD_V4}:8080", seen
    assert seen["local"] == f"{POD_V4}:15006", seen
    seen = assert_reached(t.tcp_connect(t.peer, POD_V4, 15021, uid=0), "health", "peer → pod:15021 (-d)")
    assert seen["local"] == f"{POD_V4}:15021", seen
    seen = assert_reached(t.tcp_connect(t.peer, POD_V4, 15008, uid=0), "tunnel", "peer → pod:15008 (-e)")
    assert seen["local"] == f"{POD_V4}:15008", seen


def test_loopback_paths(backend: str, redirect_pod: Topology, listeners: None) -> None:
    """The pod-local paths Istio's ISTIO_OUTPUT rules exist for (docs/istio-compat.md
    "istio-iptables rules", loopback paths):

    * the app talking to itself (127.0.0.1 or its own pod IP) is not captured;
    * the proxy calling its own pod IP is sent to the *inbound* listener (a VIP that resolves to
      this pod: app → Envoy outbound → Envoy inbound → app);
    * Envoy's inbound passthrough (source 127.0.0.6) reaches the app and is not captured again.
    """
    t = redirect_pod
    t.tcp_listener(t.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    t.tcp_listener(t.pod, "0.0.0.0", 15006, uid=PROXY_UID, tag="inbound")
    t.tcp_listener(t.pod, "0.0.0.0", 8080, uid=APP_UID, tag="app")
    assert_reached(t.tcp_connect(t.pod, "127.0.0.1", 8080, uid=APP_UID), "app", "uid 1000 → 127.0.0.1:8080")
    assert_reached(t.tcp_connect(t.pod, POD_V4, 8080, uid=APP_UID), "app", "uid 1000 → own pod IP:8080")
    seen = assert_reached(t.tcp_connect(t.pod, POD_V4, 8080, uid=PROXY_UID), "inbound",
                          "uid 1337 → own pod IP:8080")
    assert seen["orig_dst"] == f"{POD_V4}:8080", seen
    seen = assert_reached(t.tcp_connect(t.pod, POD_V4, 8080, uid=PROXY_UID, bind="127.0.0.6"), "app",
                          "uid 1337 from 127.0.0.6 → own pod IP:8080 (inbound passthrough)")
    assert seen["peer"].startswith("127.0.0.6:"), seen


# Flag variations, each checked by where connections land. (direction, uid, address, port, tag)
Probe = tuple[str, int, str, int, str]
FLAG_CASES = [
    pytest.param({"-o": "3306"}, [("out", APP_UID, SVC_V4, 3306, "peer:3306"),
                                  ("out", APP_UID, SVC_V4, 80, "outbound")], id="o-exclude-outbound-port"),
    pytest.param({"-i": f"{PEER_V4}/32"}, [("out", APP_UID, PEER_V4, 80, "outbound"),
                                           ("out", APP_UID, SVC_V4, 80, "peer:80")], id="i-include-cidr"),
    pytest.param({"-x": f"{SVC_V4}/32"}, [("out", APP_UID, SVC_V4, 80, "peer:80"),
                                          ("out", APP_UID, PEER_V4, 80, "outbound")], id="x-exclude-cidr"),
    pytest.param({"-i": "", "-q": "80"}, [("out", APP_UID, SVC_V4, 80, "outbound"),
                                          ("out", APP_UID, SVC_V4, 3306, "peer:3306")], id="q-include-port-only"),
    # eth1 (added for this case) routes 10.99.0.0/24: traffic leaving through it is still
    # captured (REDIRECT happens before the packet would go out), traffic via eth0 is not.
    pytest.param({"-c": "eth0"}, [("out", APP_UID, SVC_V4, 80, "peer:80"),
                                  ("in", 0, POD_V4, 8080, "app:8080"),
                                  ("out", APP_UID, "10.99.0.1", 80, "outbound")], id="c-exclude-interface"),
]


@pytest.mark.parametrize(("overrides", "probes"), FLAG_CASES)
def test_capture_flags_steer_traffic(backend: str, topo: Topology, overrides: dict[str, str],
                                     probes: list[Probe]) -> None:
    """-o, -i, -x, -q and -c change *which* connections are captured; each case sends one
    connection that must be captured and one that must not, and checks who answered."""
    if "-c" in overrides:
        # A second NIC (a veth whose other end stays in the pod: no dummy driver needed).
        topo.run(topo.pod, ["ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p"])
        topo.run(topo.pod, ["ip", "addr", "add", "10.99.0.2/24", "dev", "eth1"])
        topo.run(topo.pod, ["ip", "link", "set", "eth1", "up"])
        topo.run(topo.pod, ["ip", "link", "set", "eth1p", "up"])
    init_ok(topo, sidecar_args(backend, None, overrides=overrides))
    topo.tcp_listener(topo.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    topo.tcp_listener(topo.pod, "0.0.0.0", 15006, uid=PROXY_UID, tag="inbound")
    topo.tcp_listener(topo.pod, "0.0.0.0", 8080, uid=APP_UID, tag="app:8080")
    for port in (80, 3306):
        topo.tcp_listener(topo.peer, "0.0.0.0", port, uid=0, tag=f"peer:{port}")
    for direction, uid, host, port, tag in probes:
        ns = topo.pod if direction == "out" else topo.peer
        assert_reached(topo.tcp_connect(ns, host, port, uid=uid), tag,
                       f"{direction} uid {uid} → {host}:{port} with {overrides}")


# --------------------------------------------------------------------------------------------
# 5: IPv6


def test_ipv6_outbound_and_dns(backend: str, redirect_pod_v6: Topology, listeners: None) -> None:
    """5a. With --ipv6 on, v6 outbound TCP and v6 DNS are captured for the app and not for the
    proxy, exactly as in v4 (ip6tables has its own SO_ORIGINAL_DST)."""
    t = redirect_pod_v6
    snap = t.snapshot(backend)
    assert snap.has("-A OUTPUT -j ISTIO_OUTPUT", v6=True), f"no v6 rules in {backend}:\n{snap}"
    t.tcp_listener(t.pod, "::1", 15001, uid=PROXY_UID, tag="outbound6")
    t.tcp_listener(t.peer, SVC_V6, 80, uid=0, tag="service6")
    agent = t.dns_listener(t.pod, "::1", 15053, AGENT_DNS_ANSWER_V6, uid=PROXY_UID, tag="agent6")
    t.dns_listener(t.peer, PEER_V6, 53, UPSTREAM_DNS_ANSWER_V6, uid=0, tag="upstream6")

    seen = assert_reached(t.tcp_connect(t.pod, SVC_V6, 80, uid=APP_UID), "outbound6", "uid 1000 → [fd96::10]:80")
    assert seen["orig_dst"] == f"[{SVC_V6}]:80", seen
    seen = assert_reached(t.tcp_connect(t.pod, SVC_V6, 80, uid=PROXY_UID), "service6", "uid 1337 → [fd96::10]:80")
    assert seen["peer"].startswith(f"[{POD_V6}]:"), seen

    for proto in ("udp", "tcp"):
        res = t.dns_query(t.pod, PEER_V6, uid=APP_UID, proto=proto, aaaa=True)
        assert_dns(res, AGENT_DNS_ANSWER_V6, f"[{PEER_V6}]:53", f"v6 {proto} DNS from uid 1000")
        agent.wait_event(query_event(proto))
        res = t.dns_query(t.pod, PEER_V6, uid=PROXY_UID, proto=proto, aaaa=True)
        assert_dns(res, UPSTREAM_DNS_ANSWER_V6, f"[{PEER_V6}]:53", f"v6 {proto} DNS from uid 1337")


def test_ipv6_inbound(backend: str, redirect_pod_v6: Topology, listeners: None) -> None:
    """5b. v6 inbound to an app port lands on 15006; the excluded port is not redirected."""
    t = redirect_pod_v6
    t.tcp_listener(t.pod, "::", 15006, uid=PROXY_UID, tag="inbound6")
    t.tcp_listener(t.pod, "::", 15021, uid=PROXY_UID, tag="health6")
    seen = assert_reached(t.tcp_connect(t.peer, POD_V6, 8080, uid=0), "inbound6", "peer → [fd77::2]:8080")
    assert seen["orig_dst"] == f"[{POD_V6}]:8080", seen
    seen = assert_reached(t.tcp_connect(t.peer, POD_V6, 15021, uid=0), "health6", "peer → [fd77::2]:15021")
    assert seen["local"] == f"[{POD_V6}]:15021", seen


# --------------------------------------------------------------------------------------------
# 6: TPROXY


TPROXY = {"-m": "TPROXY", "-b": "*"}


def ip_rule_has_tproxy(topo: Topology, v6: bool = False) -> bool:
    fam = ["-6"] if v6 else []
    rules = topo.ip(*fam, "rule", "show")
    return any("fwmark 0x539" in line and "lookup 133" in line for line in rules.splitlines())


def table_133(topo: Topology, v6: bool = False) -> str:
    fam = ["-6"] if v6 else []
    return topo.run(topo.pod, ["ip", *fam, "route", "show", "table", "133"], check=False).stdout.strip()


@pytest.mark.parametrize("ipv6", ["off", "on"])
def test_tproxy_inbound_preserves_destination(backend: str, topo: Topology, resolv_dir: Path,
                                              ipv6: str) -> None:
    """6. TPROXY: the inbound connection is delivered to a transparent socket on 15006 *without*
    NAT, so getsockname() is still pod:8080; the policy routing (fwmark 1337 → table 133 with
    a local default route) is in place. The proxy runs as uid 0 gid 1337 in this mode, so its
    outbound traffic must be exempt through the gid rules."""
    servers = (PEER_V4, PEER_V6) if ipv6 == "on" else (PEER_V4,)
    init_ok(topo, sidecar_args(backend, write_resolv(resolv_dir, *servers), ipv6=ipv6, overrides=TPROXY))

    assert ip_rule_has_tproxy(topo), topo.ip("rule", "show")
    assert "local default dev lo" in table_133(topo), table_133(topo)
    if ipv6 == "on":
        assert ip_rule_has_tproxy(topo, v6=True), topo.ip("-6", "rule", "show")
        assert "local default dev lo" in table_133(topo, v6=True), table_133(topo, v6=True)
    else:
        assert not ip_rule_has_tproxy(topo, v6=True), "--ipv6 off but a v6 fwmark rule exists"

    topo.tcp_listener(topo.pod, "0.0.0.0", 15006, uid=0, gid=PROXY_UID, transparent=True, tag="tproxy")
    topo.tcp_listener(topo.pod, "0.0.0.0", 15021, uid=PROXY_UID, tag="health")
    seen = assert_reached(topo.tcp_connect(topo.peer, POD_V4, 8080, uid=0), "tproxy", "peer → pod:8080")
    assert seen["local"] == f"{POD_V4}:8080", f"original destination not preserved: {seen}"
    assert seen["peer"].startswith(f"{PEER_V4}:"), f"source not preserved: {seen}"
    assert_reached(topo.tcp_connect(topo.peer, POD_V4, 15021, uid=0), "health", "peer → pod:15021 (-d)")
    if ipv6 == "on":
        topo.tcp_listener(topo.pod, "::", 15006, uid=0, gid=PROXY_UID, transparent=True, tag="tproxy6")
        seen = assert_reached(topo.tcp_connect(topo.peer, POD_V6, 8080, uid=0), "tproxy6", "peer → [fd77::2]:8080")
        assert seen["local"] == f"[{POD_V6}]:8080", f"original destination not preserved: {seen}"

    # Outbound is still REDIRECT; the proxy (uid 0, gid 1337) is exempt through -g (= -u).
    topo.tcp_listener(topo.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    topo.tcp_listener(topo.peer, SVC_V4, 80, uid=0, tag="service")
    assert_reached(topo.tcp_connect(topo.pod, SVC_V4, 80, uid=APP_UID), "outbound", "uid 1000 → VIP:80")
    assert_reached(topo.tcp_connect(topo.pod, SVC_V4, 80, uid=0, gid=PROXY_UID), "service",
                   "uid 0 gid 1337 → VIP:80")


# --------------------------------------------------------------------------------------------
# 7: idempotency, reconcile, cleanup


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_rerun_with_same_flags_is_a_noop(backend: str, topo: Topology, resolv_dir: Path, mode: str) -> None:
    """7a. An init container re-run after a pod restart must not fail with "chain already
    exists" (istio#21030) nor duplicate rules; in TPROXY mode not fail on the existing ip rule
    either (Istio adds it with create+exclusive: docs/istio-compat.md "istio-iptables rules").
    Foreign rules present before the first run are not a reason to refuse it."""
    N.seed_foreign_rules(topo, backend)
    before = topo.snapshot(backend)
    if mode == "TPROXY":
        args = sidecar_args(backend, write_resolv(resolv_dir, PEER_V4, PEER_V6), ipv6="on", overrides=TPROXY)
    else:
        args = sidecar_args(backend, write_resolv(resolv_dir, PEER_V4))
    init_ok(topo, args)
    first = topo.snapshot(backend)
    routing = (topo.ip("rule", "show"), topo.ip("-6", "rule", "show"), table_133(topo), table_133(topo, v6=True))
    assert first != before, "the first run changed nothing"
    assert "FOREIGN_CHAIN" in first.v4 and "192.0.2.1" in first.v4, f"foreign rules lost:\n{first}"
    proc = init_ok(topo, args)
    assert_tables(topo.snapshot(backend), first, "the rerun changed the tables", proc)
    again = (topo.ip("rule", "show"), topo.ip("-6", "rule", "show"), table_133(topo), table_133(topo, v6=True))
    assert again == routing, f"the rerun changed policy routing:\n{routing}\n=>\n{again}" + describe(proc)


def test_changed_flags_require_reconcile(backend: str, topo: Topology, resolv_dir: Path) -> None:
    """7b. Different flags on top of existing rules: refuse (exit 1, say why, touch nothing)
    unless --reconcile, which must leave exactly what a fresh install of the new flags gives
    (same foreign rules, no leftover guardrails, no stale ISTIO rules)."""
    resolv = write_resolv(resolv_dir, PEER_V4)
    old = sidecar_args(backend, resolv)
    new = sidecar_args(backend, resolv, overrides={"-b": "8080,9090"})
    N.seed_foreign_rules(topo, backend)
    init_ok(topo, old)
    installed = topo.snapshot(backend)

    proc = pilotfish_init(topo, new)
    assert proc.returncode == 1, "changed flags without --reconcile must exit 1" + describe(proc)
    assert "reconcile" in (proc.stderr + proc.stdout).lower(), \
        "the refusal should tell the user about --reconcile" + describe(proc)
    assert_tables(topo.snapshot(backend), installed, "the refused run changed the tables", proc)

    proc = init_ok(topo, new + ["--reconcile"])
    reconciled = topo.snapshot(backend)
    with N.topology() as fresh:
        N.seed_foreign_rules(fresh, backend)
        init_ok(fresh, new)
        expected = fresh.snapshot(backend)
    assert_tables(reconciled, expected, "after --reconcile (actual) vs a fresh install of the new flags "
                                        "(expected)", proc)

    # And the data path follows the new flags: 8080 captured, 7070 (no longer "*") not.
    topo.tcp_listener(topo.pod, "0.0.0.0", 15006, uid=PROXY_UID, tag="inbound")
    topo.tcp_listener(topo.pod, "0.0.0.0", 7070, uid=APP_UID, tag="app7070")
    assert_reached(topo.tcp_connect(topo.peer, POD_V4, 8080, uid=0), "inbound", "peer → pod:8080")
    assert_reached(topo.tcp_connect(topo.peer, POD_V4, 7070, uid=0), "app7070", "peer → pod:7070")


@pytest.mark.parametrize("form", ["--cleanup-only", "clean"])
def test_cleanup_restores_previous_tables(backend: str, topo: Topology, resolv_dir: Path, form: str) -> None:
    """7c. Cleanup with the install flags returns the tables to exactly the pre-install state:
    our rules and chains go, foreign rules and chains in the same tables stay (VM uninstall,
    istio-start.sh's cleanup-then-install)."""
    args = sidecar_args(backend, write_resolv(resolv_dir, PEER_V4))
    N.seed_foreign_rules(topo, backend)
    before = topo.snapshot(backend)
    init_ok(topo, args)
    assert topo.snapshot(backend) != before, "the install changed nothing"
    if form == "clean":
        proc = init_ok(topo, args, subcommand=("init", "clean"))
    else:
        proc = init_ok(topo, args + ["--cleanup-only"])
    assert_tables(topo.snapshot(backend), before, "cleanup did not restore the pre-install tables", proc)


def test_tproxy_cleanup_removes_ip_rule_and_route(backend: str, topo: Topology, resolv_dir: Path) -> None:
    """7d. TPROXY cleanup also removes the fwmark rule and table-133 route (Istio leaves them,
    which breaks a later re-install with EEXIST: docs/istio-compat.md "istio-iptables rules").
    All differences are collected before failing, so one run shows everything that cleanup left
    behind."""
    args = sidecar_args(backend, write_resolv(resolv_dir, PEER_V4, PEER_V6), ipv6="on", overrides=TPROXY)
    N.seed_foreign_rules(topo, backend)
    before = topo.snapshot(backend)
    rules_before = (topo.ip("rule", "show"), topo.ip("-6", "rule", "show"))
    init_ok(topo, args)
    assert ip_rule_has_tproxy(topo) and ip_rule_has_tproxy(topo, v6=True), topo.ip("rule", "show")
    proc = init_ok(topo, args + ["--cleanup-only"])
    problems: list[str] = []
    after = topo.snapshot(backend)
    if after != before:
        problems.append("tables not restored (expected = before install):\n" + N.snapshot_diff(before, after))
    rules_after = (topo.ip("rule", "show"), topo.ip("-6", "rule", "show"))
    if rules_after != rules_before:
        problems.append(f"ip rules not restored:\nbefore: {rules_before}\nafter: {rules_after}")
    if table_133(topo) or table_133(topo, v6=True):
        problems.append(f"table 133 not empty: v4 {table_133(topo)!r} v6 {table_133(topo, v6=True)!r}")
    if problems:
        pytest.fail("\n\n".join(problems) + describe(proc), pytrace=False)
    # A second install after cleanup must work (no EEXIST from a leftover rule).
    init_ok(topo, args)
    assert ip_rule_has_tproxy(topo)


# --------------------------------------------------------------------------------------------
# 8: input validation


BAD_INPUTS = [
    pytest.param("-z", "70000", ("-z", "--inbound-capture-port"), id="port-out-of-range"),
    pytest.param("-i", "10.0.0.0/33", ("-i", "--istio-service-cidr"), id="cidr-prefix-33"),
    pytest.param("-m", "tproxy", ("-m", "--istio-inbound-interception-mode"), id="mode-lowercase"),
    pytest.param("-x", "*", ("-x", "--istio-service-exclude-cidr"), id="exclude-wildcard"),
    # Reversed ranges: iptables refused them half way through the apply, naming no flag.
    pytest.param("-b", "80:70", ("-b", "--istio-inbound-ports"), id="inbound-range-reversed"),
    pytest.param("-d", "80:70", ("-d", "--istio-local-exclude-ports"), id="exclude-range-reversed"),
    pytest.param("-q", "9090:8080", ("-q", "--istio-outbound-ports"), id="outbound-range-reversed"),
    pytest.param("-o", "80:70", ("-o", "--istio-local-outbound-ports-exclude"), id="outbound-exclude-reversed"),
    # Interface names a backend reinterprets: legacy installed `! -i eth0 -j RETURN` for '!eth0'
    # (everything but eth0 bypassed capture), nft installed `-i ab` for 'a"b'.
    pytest.param("-c", "!eth0", ("-c", "--istio-exclude-interfaces"), id="interface-negated"),
    pytest.param("-c", 'a"b', ("-c", "--istio-exclude-interfaces"), id="interface-quote"),
    pytest.param("-c", "a b", ("-c", "--istio-exclude-interfaces"), id="interface-space"),
    pytest.param("-c", "abcdefghijklmnop", ("-c", "--istio-exclude-interfaces"), id="interface-16-bytes"),
    pytest.param("-c", "..", ("-c", "--istio-exclude-interfaces"), id="interface-dotdot"),
    pytest.param("-c", "a+b", ("-c", "--istio-exclude-interfaces"), id="interface-inner-plus"),
    pytest.param("-k", "!eth0", ("-k", "--kube-virt-interfaces"), id="virt-interface-negated"),
    pytest.param("-k", 'a"b', ("-k", "--kube-virt-interfaces"), id="virt-interface-quote"),
]


@pytest.mark.parametrize(("flag", "value", "names"), BAD_INPUTS)
def test_bad_input_rejected_without_touching_tables(backend: str, topo: Topology, resolv_dir: Path,
                                                    flag: str, value: str, names: tuple[str, ...]) -> None:
    """8. Istio accepts some of these silently (``-m tproxy`` becomes REDIRECT) or fails half way;
    pilotfish must refuse up front, say which flag and value, and not touch any table."""
    N.seed_foreign_rules(topo, backend)
    before = {b: topo.snapshot(b) for b in BACKENDS if N.backend_skip_reason(b) is None}
    proc = pilotfish_init(topo, sidecar_args(backend, write_resolv(resolv_dir, PEER_V4),
                                             overrides={flag: value}))
    assert proc.returncode == 1, f"{flag} {value!r} must exit 1" + describe(proc)
    msg = proc.stderr + proc.stdout
    assert value in msg, f"message does not name the value {value!r}" + describe(proc)
    long_names = [n for n in names if n.startswith("--")]
    assert any(value in line and any(n in line for n in long_names) for line in msg.splitlines()), \
        f"no line names both the flag ({' or '.join(names)}) and the value" + describe(proc)
    for b, snap in before.items():
        assert_tables(topo.snapshot(b), snap, f"a rejected run changed the {b} tables", proc)


def test_edge_interface_names_install_rerun_and_clean(backend: str, topo: Topology) -> None:
    """Names at the edge of what is valid (15 bytes, the '+' wildcard) are installed as given, a
    rerun finds them in place and cleanup removes them: with '!eth0' or 'a"b' the backend wrote
    something else, so the rerun was refused and cleanup left the rules."""
    N.seed_foreign_rules(topo, backend)
    before = topo.snapshot(backend)
    args = sidecar_args(backend, None, overrides={"-c": "abcdefghijklmno,veth+", "-k": "kv0+"})
    init_ok(topo, args)
    installed = topo.snapshot(backend)
    for rule in ("-A PREROUTING -i abcdefghijklmno -j RETURN", "-A OUTPUT -o veth+ -j RETURN",
                 "-A PREROUTING -i kv0+ -j RETURN", "-A PREROUTING -i kv0+ -j ISTIO_REDIRECT"):
        assert installed.has(rule), f"{rule!r} missing:\n{installed}"
    proc = init_ok(topo, args)
    assert "nothing to do" in proc.stderr, describe(proc)
    proc = init_ok(topo, args, subcommand=("init", "clean"))
    assert_tables(topo.snapshot(backend), before, "cleanup left rules of the edge names", proc)


@pytest.mark.parametrize(("extra", "name"), [
    pytest.param(("--no-such-flag",), "--no-such-flag", id="unknown-flag"),
    pytest.param(("--iptables-backend", "bogus"), "bogus", id="unknown-backend"),
    pytest.param(("--ipv6", "maybe"), "maybe", id="bad-ipv6-choice"),
])
def test_bad_command_line_exits_1(backend: str, topo: Topology, extra: tuple[str, ...], name: str) -> None:
    """8b. The contract is exit 1 for *any* error, including command-line parse errors (argparse
    would exit 2, Istio's cobra 255); an init container's exit code is what operators see."""
    before = topo.snapshot(backend)
    proc = pilotfish_init(topo, sidecar_args(backend, None) + list(extra))
    assert proc.returncode == 1, f"{' '.join(extra)} must exit 1" + describe(proc)
    assert name in proc.stderr + proc.stdout, f"message does not name {name!r}" + describe(proc)
    assert_tables(topo.snapshot(backend), before, "a rejected run changed the tables", proc)


def test_dns_capture_enabled_by_istio_meta_env(backend: str, topo: Topology, resolv_dir: Path) -> None:
    """DNS capture is normally switched on by the injector copying ``ISTIO_META_DNS_CAPTURE=true``
    into istio-init's environment, not by the flag (docs/istio-compat.md
    "istio-iptables configuration"); the env alone must do it."""
    resolv = write_resolv(resolv_dir, PEER_V4)
    args = sidecar_args(backend, None) + ["--resolv-conf", str(resolv)]
    proc = topo.run(topo.pod, ["env", "ISTIO_META_DNS_CAPTURE=true", N.pilotfish_bin(), "init", *args],
                    check=False, timeout=60)
    assert proc.returncode == 0, "pilotfish init failed" + describe(proc)
    topo.dns_listener(topo.pod, "127.0.0.1", 15053, AGENT_DNS_ANSWER_V4, uid=PROXY_UID, tag="agent")
    topo.dns_listener(topo.peer, PEER_V4, 53, UPSTREAM_DNS_ANSWER_V4, uid=0, tag="upstream")
    res = topo.dns_query(topo.pod, PEER_V4, uid=APP_UID)
    assert_dns(res, AGENT_DNS_ANSWER_V4, f"{PEER_V4}:53", "UDP DNS from uid 1000 with ISTIO_META_DNS_CAPTURE")


def test_dry_run_changes_nothing(backend: str, topo: Topology, resolv_dir: Path) -> None:
    """``--dry-run`` prints the plan and touches neither the tables nor the policy routing,
    even in TPROXY mode where a real run adds an ip rule and a route."""
    N.seed_foreign_rules(topo, backend)
    before = topo.snapshot(backend)
    rules_before = topo.ip("rule", "show")
    args = sidecar_args(backend, write_resolv(resolv_dir, PEER_V4), overrides=TPROXY)
    proc = pilotfish_init(topo, args + ["--dry-run"])
    assert proc.returncode == 0, "--dry-run failed" + describe(proc)
    assert "ISTIO_OUTPUT" in proc.stdout + proc.stderr, "--dry-run did not show the plan" + describe(proc)
    assert_tables(topo.snapshot(backend), before, "--dry-run changed the tables", proc)
    assert topo.ip("rule", "show") == rules_before and table_133(topo) == "", "--dry-run changed routing"


# --------------------------------------------------------------------------------------------
# 9: validation mode


def validation_args(backend: str) -> list[str]:
    """What Istio's istio-validation container runs: the same flags plus --run-validation
    --skip-rule-apply, as the proxy uid with no capabilities (it cannot touch iptables)."""
    return sidecar_args(backend, None, extra=("--run-validation", "--skip-rule-apply"))


def _require_pilotfish_runnable_by(uid: int) -> None:
    res = N.run(N.as_user([N.pilotfish_bin(), "--help"], uid), check=False)
    if res.returncode != 0:
        pytest.skip(f"{N.pilotfish_bin()} is not executable by uid {uid} here "
                    f"(venv interpreter unreadable?): {res.stderr.strip()[-200:]}")


def test_validation_passes_with_rules(backend: str, topo: Topology) -> None:
    """9a. With the rules installed, the proxy-uid probe to 127.0.0.6:15002 is redirected to
    15006 and the validator sees original port 15002: exit 0."""
    _require_pilotfish_runnable_by(PROXY_UID)
    init_ok(topo, sidecar_args(backend, None))
    proc = pilotfish_init(topo, validation_args(backend), uid=PROXY_UID, gid=PROXY_UID)
    assert proc.returncode == 0, "validation should pass with rules installed" + describe(proc)


def test_validation_fails_without_rules(backend: str, topo: Topology) -> None:
    """9b. Without rules nothing redirects the probe: exit 126 (after the probe timeout), which
    makes kubelet restart the pod instead of running an app with no capture."""
    _require_pilotfish_runnable_by(PROXY_UID)
    proc = pilotfish_init(topo, validation_args(backend), uid=PROXY_UID, gid=PROXY_UID, timeout=60)
    assert proc.returncode == 126, "validation without rules must exit 126" + describe(proc)


# --------------------------------------------------------------------------------------------
# 10: capabilities


def bounding_set() -> list[str]:
    out = N.run(["capsh", "--print"]).stdout
    for line in out.splitlines():
        if line.startswith("Bounding set ="):
            return [c for c in line.split("=", 1)[1].strip().split(",") if c]
    raise N.HarnessError(f"no bounding set in capsh --print:\n{out}")


def test_init_needs_only_net_admin_and_net_raw(backend: str, topo: Topology) -> None:
    """10. istio-init runs with NET_ADMIN+NET_RAW only (drop ALL: docs/istio-compat.md
    "istio-iptables configuration"); pilotfish init must not silently need more (e.g. SYS_ADMIN
    for mounts, DAC_OVERRIDE for lock files)."""
    keep = {"cap_net_admin", "cap_net_raw"}
    drop = [c for c in bounding_set() if c not in keep]
    cmd = shlex.join([N.pilotfish_bin(), "init", *sidecar_args(backend, None)])
    proc = topo.run(topo.pod, ["capsh", f"--drop={','.join(drop)}", "--", "-c",
                               f"capsh --print; echo ===; exec {cmd}"], check=False, timeout=60)
    caps_out, _, _ = proc.stdout.partition("===")
    fields = dict(ln.split("=", 1) if ln.startswith("Bounding set") else ln.split(":", 1)
                  for ln in caps_out.splitlines() if ln.startswith(("Bounding set", "Current:")))
    bounding = set(fields.get("Bounding set ", "").strip().split(","))
    current = fields.get("Current", "").strip()
    assert bounding == keep, f"harness: bounding set is {bounding}, not {keep}:\n{caps_out}{describe(proc)}"
    assert current == "cap_net_admin,cap_net_raw=ep", f"harness: capabilities are {current!r}\n{caps_out}"
    assert proc.returncode == 0, "pilotfish init failed with only NET_ADMIN+NET_RAW" + describe(proc)
    snap = topo.snapshot(backend)
    assert snap.has("-A OUTPUT -j ISTIO_OUTPUT") and snap.has("-A PREROUTING -p tcp -j ISTIO_INBOUND"), \
        f"rules not in place:\n{snap}"
    topo.tcp_listener(topo.pod, "127.0.0.1", 15001, uid=PROXY_UID, tag="outbound")
    seen = assert_reached(topo.tcp_connect(topo.pod, SVC_V4, 80, uid=APP_UID), "outbound", "uid 1000 → VIP:80")
    assert seen["orig_dst"] == f"{SVC_V4}:80", seen
