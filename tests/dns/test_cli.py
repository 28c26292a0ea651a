"""`pilotfish dns` as a user runs it: a real process, queried with dig, forwarding to a real
dnsmasq; reloads of its table file; bad settings refused before anything is bound."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import PILOTFISH, Process

DIG = shutil.which("dig")
DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)

pytestmark = pytest.mark.skipif(
    not (DIG and DNSMASQ), reason="needs dig and dnsmasq (make test installs dnsutils, dnsmasq-base)"
)

TABLE = {
    "table": {
        "productpage.ns1.svc.cluster.local": {"ips": ["9.9.9.9"], "registry": "Kubernetes", "shortname": "productpage", "namespace": "ns1"},
        "www.google.com": {"ips": ["1.1.1.1", "2001:db8::1"], "registry": "External"},
        "details.ns2.svc.cluster.remote": {"ips": ["11.11.11.11", "12.12.12.12", "13.13.13.13"], "registry": "External"},
    }
}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[int]:
    """dnsmasq on a free loopback port: upstream.example with TTL 60, NXDOMAIN for the rest of example."""
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.53 upstream.example\n")
    for _ in range(5):
        port = _free_port()
        proc = Process(
            [DNSMASQ, "--no-daemon", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--addn-hosts={hosts}", "--local=/example/", "--local-ttl=60", "--listen-address=127.0.0.1", f"--port={port}",
             "--bind-interfaces", "--log-facility=-"],
            tmp_path / "dnsmasq.log",
        )
        try:
            proc.wait_for("read .*hosts", timeout=5)
        except AssertionError:
            proc.stop()
            continue
        yield port
        proc.stop()
        return
    pytest.fail("dnsmasq did not start")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    table = tmp_path / "table.json"
    table.write_text(json.dumps(TABLE))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nsearch ns1.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n")
    return table, resolv


@pytest.fixture
def proxy(tmp_path: Path, files: tuple[Path, Path], upstream: int) -> Iterator[tuple[Process, int]]:
    table, resolv = files
    proc = Process(
        [PILOTFISH, "dns", "--name-table", str(table), "--resolv-conf", str(resolv),
         "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream}", "--proxy-namespace", "ns1",
         "--metrics-addr", "127.0.0.1:0"],
        tmp_path / "pilotfish.log",
    )
    port = int(proc.wait_for(r"listening tcp 127\.0\.0\.1:(\d+)").group(1))
    yield proc, port
    assert proc.stop() == 0
    assert "Traceback" not in proc.log.read_text()


def dig(port: int, *args: str) -> str:
    out = subprocess.run([DIG, "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args],
                         capture_output=True, text=True, timeout=10)
    return out.stdout


def short(port: int, *args: str) -> list[str]:
    return dig(port, "+short", *args).split()


def test_dig_mesh_names(proxy: tuple[Process, int]) -> None:
    _, port = proxy
    assert short(port, "productpage.ns1.svc.cluster.local") == ["9.9.9.9"]
    assert short(port, "productpage") == ["9.9.9.9"]  # the short name in the proxy's namespace
    assert short(port, "productpage.ns1") == ["9.9.9.9"]
    assert short(port, "www.google.com", "AAAA") == ["2001:db8::1"]
    full = dig(port, "www.google.com.ns1.svc.cluster.local")
    assert "status: NOERROR" in full and " aa " in full.split("flags:")[1].split(";")[0] + " "
    assert short(port, "www.google.com.ns1.svc.cluster.local") == ["www.google.com.", "1.1.1.1"]


def test_answer_order_changes_between_replies(proxy: tuple[Process, int]) -> None:
    """dig sends a fresh EDNS cookie per query, so this also covers queries that never repeat."""
    _, port = proxy
    orders = {tuple(short(port, "details.ns2.svc.cluster.remote")) for _ in range(4)}
    orders |= {tuple(short(port, "+nocookie", "details.ns2.svc.cluster.remote")) for _ in range(4)}
    assert len(orders) > 1 and all(sorted(o) == ["11.11.11.11", "12.12.12.12", "13.13.13.13"] for o in orders)


def test_dig_search_expanded_name_through_the_resolver(proxy: tuple[Process, int]) -> None:
    """What a pod's stub resolver sends first for `www.google.com` with ndots:5."""
    _, port = proxy
    assert short(port, "www.google.com.svc.cluster.local") == ["www.google.com.", "1.1.1.1"]


def test_dig_forwarded_name_and_nxdomain(proxy: tuple[Process, int]) -> None:
    _, port = proxy
    assert short(port, "upstream.example") == ["192.0.2.53"]
    assert "status: NXDOMAIN" in dig(port, "nowhere.example")


def test_dig_over_tcp(proxy: tuple[Process, int]) -> None:
    _, port = proxy
    assert short(port, "+tcp", "productpage") == ["9.9.9.9"]
    assert short(port, "+tcp", "upstream.example") == ["192.0.2.53"]


def test_cache_and_metrics(proxy: tuple[Process, int]) -> None:
    proc, port = proxy
    for _ in range(3):
        assert short(port, "upstream.example") == ["192.0.2.53"]
    metrics_port = int(proc.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)").group(1))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/stats/prometheus", timeout=5).read().decode()
    values = dict(re.findall(r"^(\w+) ([\d.e+]+)$", text, re.M))
    assert float(values["istio_agent_dns_upstream_requests_total"]) == 1
    assert float(values["pilotfish_dns_cache_hits_total"]) == 2
    assert float(values["istio_agent_dns_requests_total"]) == 3
    assert "istio_agent_dns_upstream_request_duration_seconds_bucket" in text


def test_table_reload_on_sighup_and_rejected_bad_file(proxy: tuple[Process, int], files: tuple[Path, Path]) -> None:
    proc, port = proxy
    table, _ = files
    new = {"table": {"reviews.ns1.svc.cluster.local": {"ips": ["10.0.0.7"], "registry": "Kubernetes", "shortname": "reviews", "namespace": "ns1"}}}
    tmp = table.with_suffix(".tmp")
    tmp.write_text(json.dumps(new))
    tmp.replace(table)
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_for(r"reloading name table")
    deadline = time.monotonic() + 5
    while short(port, "reviews") != ["10.0.0.7"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert short(port, "reviews") == ["10.0.0.7"]
    table.write_text('{"table": {"x": {"ips": "not a list"}}}')
    proc.wait_for(r"ERROR\s+dns: rejected name table \(file change\).*still serving the previous table")
    assert short(port, "reviews") == ["10.0.0.7"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PILOTFISH, *args], capture_output=True, text=True, timeout=20,
                          env={**os.environ, **(env or {})})


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


def test_environment_is_read_and_flags_win(tmp_path: Path, files: tuple[Path, Path], upstream: int) -> None:
    table, resolv = files
    env = {**os.environ, "POD_NAMESPACE": "ns1", "DNS_PROXY_ADDR": "127.0.0.1:0", "DNS_FORWARD_TIMEOUT": "300ms"}
    proc = Process([PILOTFISH, "dns", "--name-table", str(table), "--resolv-conf", str(resolv),
                    "--upstream", f"127.0.0.1:{upstream}", "--forward-parallel"], tmp_path / "env.log", env=env)
    try:
        port = int(proc.wait_for(r"listening udp 127\.0\.0\.1:(\d+)").group(1))
        proc.wait_for(r"\(parallel, timeout 0\.3s\)")
        assert short(port, "productpage") == ["9.9.9.9"]  # POD_NAMESPACE=ns1 gives the short name
    finally:
        assert proc.stop() == 0


def test_version() -> None:
    done = _run("--version")
    assert done.returncode == 0 and re.fullmatch(r"pilotfish \d+\.\d+\.\d+\n", done.stdout)
