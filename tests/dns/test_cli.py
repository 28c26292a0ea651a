"""`pilotfish dns` as a user runs it: a real process, queried with dig, forwarding to a real
dnsmasq; reloads of its table file; bad settings refused before anything is bound."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from clirun import run_cli
from procs import PILOTFISH, Process

DIG = shutil.which("dig")
DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)

pytestmark = pytest.mark.skipif(
    not (DIG and DNSMASQ), reason="needs dig and dnsmasq (make test installs dnsutils, dnsmasq-base)"
)

DNSMASQ_PORT = 53  # in a namespace of the test's own (fixture netns)

TABLE = {
    "table": {
        "productpage.ns1.svc.cluster.local": {"ips": ["9.9.9.9"], "registry": "Kubernetes", "shortname": "productpage", "namespace": "ns1"},
        "www.google.com": {"ips": ["1.1.1.1", "2001:db8::1"], "registry": "External"},
        "details.ns2.svc.cluster.remote": {"ips": ["11.11.11.11", "12.12.12.12", "13.13.13.13"], "registry": "External"},
    }
}


_namespaces = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test's own with only a loopback: dnsmasq can take the DNS
    port there, with no free port to guess and no other process to race for it. dnsmasq, the
    proxy and dig all run inside (`in_ns`)."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and ip(8) for a network namespace")
    name = f"pfdns{os.getpid()}x{next(_namespaces)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True, timeout=10)


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


@pytest.fixture
def upstream(tmp_path: Path, netns: str) -> Iterator[int]:
    """dnsmasq on port 53 of the namespace's loopback: upstream.example with TTL 60, NXDOMAIN
    for the rest of example."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.53 upstream.example\n")
    proc = Process(
        in_ns(netns, [
            DNSMASQ, "--no-daemon", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            f"--addn-hosts={hosts}", "--local=/example/", "--local-ttl=60", "--listen-address=127.0.0.1",
            f"--port={DNSMASQ_PORT}", "--bind-interfaces", "--log-facility=-",
        ]),
        tmp_path / "dnsmasq.log",
    )
    try:
        proc.wait_for("read .*hosts", timeout=5)
        yield DNSMASQ_PORT
    finally:
        proc.stop()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    table = tmp_path / "table.json"
    table.write_text(json.dumps(TABLE))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n")
    return table, resolv


class Proxy(NamedTuple):
    """A `pilotfish dns` process in a namespace, and its DNS port there."""

    proc: Process
    port: int
    ns: str

    def dig(self, *args: str) -> str:
        out = subprocess.run(in_ns(self.ns, [DIG, "@127.0.0.1", "-p", str(self.port), "+time=2", "+tries=1", *args]),
                             capture_output=True, text=True, timeout=10)
        return out.stdout

    def short(self, *args: str) -> list[str]:
        return self.dig("+short", *args).split()

    def fetch(self, url: str) -> str:
        """GET `url` from inside the namespace."""
        script = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        return subprocess.run(in_ns(self.ns, [sys.executable, "-c", script, url]),
                              capture_output=True, text=True, timeout=10, check=True).stdout


@pytest.fixture
def proxy(tmp_path: Path, files: tuple[Path, Path], upstream: int, netns: str) -> Iterator[Proxy]:
    table, resolv = files
    proc = Process(
        in_ns(netns, [PILOTFISH, "dns", "--name-table", str(table), "--resolv-conf", str(resolv),
                      "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream}", "--proxy-namespace", "ns1",
                      "--metrics-addr", "127.0.0.1:0"]),
        tmp_path / "pilotfish.log",
    )
    port = int(proc.wait_for(r"listening tcp 127\.0\.0\.1:(\d+)").group(1))
    yield Proxy(proc, port, netns)
    assert proc.stop() == 0
    assert "Traceback" not in proc.log.read_text()


def test_dig_mesh_names(proxy: Proxy) -> None:
    assert proxy.short("productpage.ns1.svc.cluster.local") == ["9.9.9.9"]
    assert proxy.short("productpage") == ["9.9.9.9"]  # the short name in the proxy's namespace
    assert proxy.short("productpage.ns1") == ["9.9.9.9"]
    assert proxy.short("www.google.com", "AAAA") == ["2001:db8::1"]
    full = proxy.dig("www.google.com.ns1.svc.cluster.local")
    assert "status: NOERROR" in full and " aa " in full.split("flags:")[1].split(";")[0] + " "
    assert proxy.short("www.google.com.ns1.svc.cluster.local") == ["www.google.com.", "1.1.1.1"]


def test_answer_order_changes_between_replies(proxy: Proxy) -> None:
    """dig sends a fresh EDNS cookie per query, so this also covers queries that never repeat."""
    orders = {tuple(proxy.short("details.ns2.svc.cluster.remote")) for _ in range(4)}
    orders |= {tuple(proxy.short("+nocookie", "details.ns2.svc.cluster.remote")) for _ in range(4)}
    assert len(orders) > 1 and all(sorted(o) == ["11.11.11.11", "12.12.12.12", "13.13.13.13"] for o in orders)


def test_dig_search_expanded_name_through_the_resolver(proxy: Proxy) -> None:
    """What a pod's stub resolver sends first for `www.google.com` with ndots:5."""
    assert proxy.short("www.google.com.svc.cluster.local") == ["www.google.com.", "1.1.1.1"]


def test_dig_forwarded_name_and_nxdomain(proxy: Proxy) -> None:
    assert proxy.short("upstream.example") == ["192.0.2.53"]
    assert "status: NXDOMAIN" in proxy.dig("nowhere.example")


def test_dig_over_tcp(proxy: Proxy) -> None:
    assert proxy.short("+tcp", "productpage") == ["9.9.9.9"]
    assert proxy.short("+tcp", "upstream.example") == ["192.0.2.53"]


def test_cache_and_metrics(proxy: Proxy) -> None:
    proc = proxy.proc
    for _ in range(3):
        assert proxy.short("upstream.example") == ["192.0.2.53"]
    metrics_port = int(proc.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)").group(1))
    text = proxy.fetch(f"http://127.0.0.1:{metrics_port}/stats/prometheus")
    values = dict(re.findall(r"^(\w+) ([\d.e+]+)$", text, re.M))
    assert float(values["istio_agent_dns_upstream_requests_total"]) == 1
    assert float(values["pilotfish_dns_cache_hits_total"]) == 2
    assert float(values["istio_agent_dns_requests_total"]) == 3
    assert "istio_agent_dns_upstream_request_duration_seconds_bucket" in text


def test_table_reload_on_sighup_and_rejected_bad_file(proxy: Proxy, files: tuple[Path, Path]) -> None:
    proc = proxy.proc
    table, _ = files
    new = {"table": {"reviews.ns1.svc.cluster.local": {"ips": ["10.0.0.7"], "registry": "Kubernetes", "shortname": "reviews", "namespace": "ns1"}}}
    tmp = table.with_suffix(".tmp")
    tmp.write_text(json.dumps(new))
    tmp.replace(table)
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(r"reloading name table")
    deadline = time.monotonic() + 5
    while proxy.short("reviews") != ["10.0.0.7"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.short("reviews") == ["10.0.0.7"]
    table.write_text('{"table": {"x": {"ips": "not a list"}}}')
    proc.wait_for(r"ERROR\s+dns: rejected name table \(file change\).*still serving the previous table")
    assert proxy.short("reviews") == ["10.0.0.7"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(list(args), env)


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--forward-timeout", "5"], {}, "--forward-timeout: invalid duration '5'"),
        ([], {"DNS_FORWARD_TIMEOUT": "soon"}, "DNS_FORWARD_TIMEOUT: invalid duration 'soon'"),
        ([], {"DNS_FORWARD_PARALLEL": "yes"}, "DNS_FORWARD_PARALLEL: invalid boolean 'yes'"),
        (["--listen", "127.0.0.1"], {}, "--listen: invalid address '127.0.0.1'"),
        ([], {"DNS_PROXY_ADDR": "localhost:99999"}, "DNS_PROXY_ADDR: port out of range"),
        (["--upstream", "dns.example"], {}, "--upstream: 'dns.example' is not an IP"),
        (["--cache-size", "-1"], {}, "--cache-size: want a whole number of 0 or more, got '-1'"),
        (["--cache-max-bytes", "4M"], {}, "--cache-max-bytes: want a whole number of 0 or more, got '4M'"),
        ([], {"PILOTFISH_DNS_CACHE_MAX_BYTES": "-5"},
         "PILOTFISH_DNS_CACHE_MAX_BYTES: want a whole number of 0 or more, got '-5'"),
        (["--resolv-conf", "/nonexistent/resolv.conf"], {}, "cannot read /nonexistent/resolv.conf"),
    ],
)
def test_bad_settings_exit_2_naming_them(files: tuple[Path, Path], args: list[str], env: dict[str, str], message: str) -> None:
    table, resolv = files
    base = ["dns", "--name-table", str(table)]
    if "--resolv-conf" not in args:
        base += ["--resolv-conf", str(resolv)]
    if "--listen" not in args and "DNS_PROXY_ADDR" not in env:
        base += ["--listen", "127.0.0.1:0"]
    done = _run(*base, *args, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "listening" not in done.stderr


def test_bad_table_file_at_start(files: tuple[Path, Path], tmp_path: Path) -> None:
    _, resolv = files
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = _run("dns", "--name-table", str(bad), "--resolv-conf", str(resolv), "--listen", "127.0.0.1:0")
    assert done.returncode == 2 and f"{bad}: not JSON" in done.stderr


def test_environment_is_read_and_flags_win(tmp_path: Path, files: tuple[Path, Path], upstream: int, netns: str) -> None:
    table, resolv = files
    env = {**os.environ, "POD_NAMESPACE": "ns1", "DNS_PROXY_ADDR": "127.0.0.1:0", "DNS_FORWARD_TIMEOUT": "300ms"}
    proc = Process(in_ns(netns, [PILOTFISH, "dns", "--name-table", str(table), "--resolv-conf", str(resolv),
                                 "--upstream", f"127.0.0.1:{upstream}", "--forward-parallel"]),
                   tmp_path / "env.log", env=env)
    try:
        port = int(proc.wait_for(r"listening udp 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(r"\(parallel, timeout 0\.3s\)")
        assert Proxy(proc, port, netns).short("productpage") == ["9.9.9.9"]  # POD_NAMESPACE=ns1 gives the short name
    finally:
        assert proc.stop() == 0


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0 and re.fullmatch(r"pilotfish \d+\.\d+\.\d+\n", done.stdout)
