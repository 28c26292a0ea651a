"""Every one of Istio's golden cases applied to a real network namespace with each backend:
a second run must find nothing to change (pilotfish's canonical form of each rule equals what
iptables-save reports), and a failure after a table was committed must leave the namespace as it
was (rollback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from golden import CASES
from netns import backend_skip_reason, ns_argv, run, skip_reason, snapshot

HERE = Path(__file__).parent
BACKENDS = ("legacy", "nft")
pytestmark = pytest.mark.skipif(bool(skip_reason()), reason=skip_reason() or "")


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    name = f"pfk{abs(hash(request.node.name)) % 10**8}"
    run(["ip", "netns", "add", name])
    run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    yield name
    run(["ip", "netns", "del", name], check=False)


def _case(ns: str, name: str, backend: str, mode: str) -> dict:
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    done = run(ns_argv(ns, [sys.executable, str(HERE / "kernel_case.py"), name, backend, mode]), check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_golden_case_applies_and_reruns_clean(namespace: str, name: str, backend: str) -> None:
    report = _case(namespace, name, backend, "rerun")
    assert report["first_changed"]
    assert not report["second_changed"], "\n".join(report["diff"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["inbound-ports-tproxy", "dns-uid-gid"])
def test_failure_mid_apply_rolls_everything_back(namespace: str, name: str, backend: str) -> None:
    """inbound-ports-tproxy changes mangle then nat (IPv4); dns-uid-gid changes nat and raw in
    both families, and fails in IPv6 after IPv4 was applied."""
    run(ns_argv(namespace, [f"iptables-{backend}", "-t", "nat", "-A", "OUTPUT", "-d", "192.0.2.1", "-j", "RETURN"]))
    before = snapshot(namespace, backend)
    report = _case(namespace, name, backend, "fail")
    assert report["error"] and "injected failure" in report["error"]
    assert "rolled back" in report["error"]
    assert snapshot(namespace, backend) == before


def _init_auto(ns: str) -> str:
    from netns import pilotfish_bin

    done = run(ns_argv(ns, [pilotfish_bin(), "init", "-i", "*", "-b", "*", "--ipv6", "off"]), check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.parametrize("seed,expect", [(None, "nft"), ("legacy", "legacy"), ("nft", "nft")])
def test_auto_backend_follows_the_namespace(namespace: str, seed: str | None, expect: str) -> None:
    """The backend that already holds rules wins, nft when none does; the other one never gets
    a rule of ours, and a rerun picks the same backend and changes nothing."""
    for backend in ("legacy", "nft"):
        if backend_skip_reason(backend):
            pytest.skip(backend_skip_reason(backend) or "")
    if seed:
        run(ns_argv(namespace, [f"iptables-{seed}", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"]))
    log = _init_auto(namespace)
    assert f"iptables backend {expect}:" in log
    other = "legacy" if expect == "nft" else "nft"
    assert "ISTIO" in snapshot(namespace, expect).v4 and "ISTIO" not in snapshot(namespace, other).v4
    log = _init_auto(namespace)
    assert f"iptables backend {expect}:" in log and "nothing to do" in log
