"""What a running `pilotfish dns` does when its table file is reloaded (SIGHUP): a file that does
not load, or a table that does not build, is one ERROR line and the previous table keeps serving;
at start the same file is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from procs import PILOTFISH
from reload_harness import dns_process, k8s

DEEP = '{"table": ' + "[" * 1000 + "]" * 1000 + "}"  # issue 7 items 5 and 14


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
    return subprocess.run([PILOTFISH, "dns", "--name-table", str(table), "--resolv-conf", str(resolv),
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("text", [DEEP, "[" * 100_000], ids=["table-1000", "top-100000"])
def test_deeply_nested_file_at_start_exits_2_with_one_line(tmp_path: Path, text: str) -> None:
    done = _start(tmp_path, text)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "nested too deeply" in lines[0] and str(tmp_path / "table.json") in lines[0]


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
