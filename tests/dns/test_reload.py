"""What a running `pilotfish dns` does when its table file is reloaded (SIGHUP): a file that does
not load, or a table that does not build, is one ERROR line and the previous table keeps serving;
at start the same file is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from clirun import run_cli
from reload_harness import DnsProcess, address, dns_process, k8s, query, wait_until

DEEP = '{"table": {"x.example": ' + "[" * 1000 + "]" * 1000 + "}}"  # issue 7 items 5 and 14


def test_deeply_nested_file_on_reload_is_rejected_and_the_old_table_serves(tmp_path: Path) -> None:
    with dns_process(tmp_path, k8s("a", "10.0.0.1")) as dns:
        assert dns.answer("a.ns1.svc.cluster.local") == "10.0.0.1"
        line = dns.reload(DEEP)
        assert "ERROR" in line and "rejected name table (SIGHUP)" in line and "nested too deeply" in line
        assert "still serving the previous table" in line
        assert dns.answer("a.ns1.svc.cluster.local") == "10.0.0.1"
        assert "installed" in dns.reload(k8s("b", "10.0.0.2"))  # and later reloads still work
        assert dns.answer("b.ns1.svc.cluster.local") == "10.0.0.2"


def _start(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    table = tmp_path / "table.json"
    table.write_text(text)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    return run_cli(["dns", "--name-table", str(table), "--resolv-conf", str(resolv), "--listen", "127.0.0.1:0"])


@pytest.mark.parametrize(
    "text,fault",
    [(DEEP, "nested too deeply"), ('{"table": ' + "[" * 1000 + "]" * 1000 + "}", '"table" must be an object'),
     ("[" * 100_000, "want an object")],
    ids=["entry-1000", "table-1000", "top-100000"],
)
def test_deeply_nested_file_at_start_exits_2_with_one_line(tmp_path: Path, text: str, fault: str) -> None:
    done = _start(tmp_path, text)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fault in lines[0] and str(tmp_path / "table.json") in lines[0]


@pytest.mark.parametrize("ip", ["10.0.0.9\x00", "\x00", "fd00::1\x00"], ids=["v4-nul", "nul", "v6-nul"])
def test_an_address_inet_pton_refuses_is_a_rejected_table_on_reload(tmp_path: Path, ip: str) -> None:
    """Issue 7 item 6: a NUL byte in an address crashed the running proxy."""
    with dns_process(tmp_path, k8s("a", "10.0.0.1")) as dns:
        line = dns.reload({**k8s("b", "10.0.0.2"), **k8s("bad", "10.0.0.3", ip)})
        assert "ERROR" in line and "rejected name table (SIGHUP)" in line
        assert "bad.ns1.svc.cluster.local" in line and repr(ip) in line
        assert dns.answer("a.ns1.svc.cluster.local") == "10.0.0.1"
        assert dns.answer("b.ns1.svc.cluster.local") is None  # nothing of the rejected table


def test_an_address_inet_pton_refuses_at_start_exits_2_with_one_line(tmp_path: Path) -> None:
    done = _start(tmp_path, json.dumps({"table": k8s("bad", "10.0.0.3\x00")}))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.ns1.svc.cluster.local" in lines[0] and "'10.0.0.3\\x00'" in lines[0]


LARGE = 200_000  # services: the paced build takes 2-4 s here; unpaced, one C call held the GIL 0.75 s
RELOADED = 50_000  # services: a build of ~0.5 s, long enough for hundreds of queries to meet it


def _large_table(path: Path, probe_ip: str, services: int = LARGE) -> None:
    with open(path, "w") as f:
        f.write('{"table": {')
        f.write(json.dumps(k8s("probe", probe_ip))[1:-1])
        f.writelines(
            f', "svc-{i}.ns-{i % 100}.svc.cluster.local": {{"ips": ["10.9.{i >> 8 & 255}.{i & 255}"], '
            f'"registry": "Kubernetes", "shortname": "svc-{i}", "namespace": "ns-{i % 100}"}}'
            for i in range(services)
        )
        f.write("}}")


def test_queries_are_answered_while_a_large_table_reloads(tmp_path: Path) -> None:
    """Issue 7 item 19: reloading 500,000 services delayed 3% of queries over 1 s. During the
    reload of a 50,000-service file every query is answered, by the old table until the swap,
    then by the new one. How long they wait is measured by bench/reload_bench.py (p50, p99 and
    the worst wait during a reload), not asserted here: the worst wait is printed."""
    big = tmp_path / "big.json"
    _large_table(big, "10.0.0.2", RELOADED)
    with dns_process(tmp_path, k8s("probe", "10.0.0.1")) as dns:
        assert dns.answer("probe.ns1.svc.cluster.local") == "10.0.0.1"
        samples: list[tuple[float, float, str | None]] = []  # (sent, waited, answer)
        stop = threading.Event()

        def ask() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                answer = address(query(dns.port, "probe.ns1.svc.cluster.local", timeout=5.0))
                samples.append((sent, time.monotonic() - sent, answer))
                time.sleep(0.002)

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            mark = len(dns.proc.text())
            reload_sent = time.monotonic()
            os.replace(big, dns.table)
            dns.proc.proc.send_signal(signal.SIGHUP)
            installed = dns.proc.wait_for(rf"name table installed: {RELOADED + 1} hosts[^\n]*", timeout=120, after=mark)
            assert wait_until(lambda: any(a == "10.0.0.2" for _, _, a in samples[-5:]), timeout=10)
        finally:
            stop.set()
            asker.join(10)
        during = [s for s in samples if s[0] >= reload_sent]
        answers = [a for _, _, a in during]
        assert None not in answers  # every query answered
        switched = answers.index("10.0.0.2")
        assert set(answers[:switched]) == {"10.0.0.1"} and set(answers[switched:]) == {"10.0.0.2"}
        assert switched >= 20, (switched, installed.group(0))  # the build was measured, not missed
        worst = max(waited for _, waited, _ in during)
        print(f"{len(during)} queries during the reload, the worst waited {worst * 1000:.0f} ms ({installed.group(0)})")


def test_sigterm_during_a_large_reload_stops_without_waiting_for_the_build(tmp_path: Path) -> None:
    """The build is paced (it takes seconds at 200,000 services): shutdown abandons it rather
    than waiting for it (Kubernetes gives 30 s, a million services take ~20 s)."""
    big = tmp_path / "big.json"
    _large_table(big, "10.0.0.2")
    dns = DnsProcess(tmp_path, k8s("probe", "10.0.0.1"))
    mark = len(dns.proc.text())
    os.replace(big, dns.table)
    dns.proc.proc.send_signal(signal.SIGHUP)
    dns.proc.wait_for(r"reloading name table", after=mark)
    assert dns.proc.stop() == 0
    log = dns.proc.text()[mark:]
    assert "stopped" in log and "name table installed" not in log and "Traceback" not in log
