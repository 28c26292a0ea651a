"""`pilotfish init` runs that meet another run, die half way or fail half way, in real network
namespaces with both backends (issue 7, items 7, 8 and 10).

The point of each race, kill or failure is reached deterministically: `hooked_init.py` runs the
real command in-process with a hook at that point (a rendezvous between two runs, a SIGKILL, an
injected kernel refusal), so nothing depends on timing. Every outcome is compared with what a
clean install (or nothing) leaves: the tables as `iptables-save` prints them (comments and
counters aside, empty tables kept), the policy routing and the addresses on lo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import netns as N
import pytest
from netns import PEER_V4, PEER_V6, Topology

HERE = Path(__file__).parent
HOOKED = str(HERE / "hooked_init.py")
TPROXY_V6 = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*",
             "-d", "15090,15021,15020", "--ipv6", "on"]


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with the value of `flag` replaced."""
    at = args.index(flag) + 1
    return [*args[:at], value, *args[at + 1:]]


REDIRECT_V6 = with_flag(TPROXY_V6, "-m", "REDIRECT")


@pytest.fixture(scope="module", autouse=True)
def _environment() -> None:
    reason = N.skip_reason() or N.init_missing_reason()
    if reason:
        pytest.skip(reason)
    N.reap_stale_namespaces()


@pytest.fixture(params=N.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    reason = N.backend_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def topo() -> Iterator[Topology]:
    with N.topology() as t:
        yield t


def dns_args(tmp: Path) -> list[str]:
    resolv = tmp / "resolv.conf"
    resolv.write_text(f"nameserver {PEER_V4}\nnameserver {PEER_V6}\n")
    return ["--redirect-dns", "--resolv-conf", str(resolv)]


def init_argv(args: list[str], backend: str, hook: str = "") -> list[str]:
    """`pilotfish init ARGS`, or the same run through hooked_init.py with HOOK."""
    head = [sys.executable, HOOKED, hook, "--"] if hook else [N.pilotfish_bin(), "init"]
    return [*head, *args, "--iptables-backend", backend]


def init(ns: str, args: list[str], backend: str, hook: str = "") -> subprocess.CompletedProcess[str]:
    return N.run(N.ns_argv(ns, init_argv(args, backend, hook)), check=False, timeout=90)


def show(proc: subprocess.CompletedProcess[str]) -> str:
    return f"\n$ {' '.join(proc.args)}\nexit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def state(ns: str, backend: str) -> tuple[N.Snapshot, dict[str, str]]:
    return N.exact_snapshot(ns, backend), N.routing(ns)


def assert_state(actual: tuple[N.Snapshot, dict[str, str]], expected: tuple[N.Snapshot, dict[str, str]],
                 what: str, proc: subprocess.CompletedProcess[str] | None = None) -> None:
    problems = []
    if actual[0] != expected[0]:
        problems.append("tables (expected -> actual):\n" + N.snapshot_diff(expected[0], actual[0]))
    for key in expected[1]:
        if actual[1][key] != expected[1][key]:
            problems.append(f"{key}: expected {expected[1][key]!r}, got {actual[1][key]!r}")
    if problems:
        pytest.fail(f"{what}:\n" + "\n".join(problems) + (show(proc) if proc else ""), pytrace=False)


def clean_install(backend: str, args: list[str], seeded: bool = True) -> tuple[N.Snapshot, dict[str, str]]:
    """What a single, undisturbed run of `args` leaves in a fresh pod namespace."""
    with N.topology() as fresh:
        if seeded:
            N.seed_foreign_rules(fresh, backend)
        proc = init(fresh.pod, args, backend)
        assert proc.returncode == 0, show(proc)
        return state(fresh.pod, backend)


# --------------------------------------------------------------------------------------------
# Item 7: two runs at once


# The second run in a mount namespace of its own with its own /run, as a second container of the
# pod or a node-side `nsenter` run would be: a lock file under /run would not be shared.
OWN_RUN = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$@"', "sh"]


@pytest.mark.parametrize("mounts", ["shared", "separate"])
def test_two_runs_at_once_leave_capture_installed(backend: str, topo: Topology, tmp_path: Path, mounts: str) -> None:
    """Both runs reach the point between reading the tables and committing together (the
    rendezvous in hooked_init.py waits for the other run to have read, or to be waiting for the
    namespace lock). Without the lock both decide from the same empty tables, one fails on a
    chain the other created and its rollback deletes the other's rules while that one reported
    success. With it the second run waits, then finds nothing to do; also when the runs do not
    share /run (`separate`: the lock is the network namespace's own inode)."""
    args = TPROXY_V6 + dns_args(tmp_path)
    N.seed_foreign_rules(topo, backend)
    wrap = {"a": [], "b": OWN_RUN if mounts == "separate" else []}
    procs = [subprocess.Popen(N.ns_argv(topo.pod, [*wrap[me], *init_argv(args, backend, f"rendezvous={tmp_path}:{me}:{peer}")]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me, peer in (("a", "b"), ("b", "a"))]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    report = "".join(f"\n--- run {i} (exit {p.returncode}) ---\n{out}" for i, (p, out) in enumerate(zip(procs, outputs)))
    assert [p.returncode for p in procs] == [0, 0], "both runs must succeed" + report
    assert sum("nothing to do" in out for out in outputs) == 1, "the second run should find nothing to do" + report
    assert_state(state(topo.pod, backend), clean_install(backend, args), "after two runs at once (expected: one "
                 "clean install)" + report)


LOCK_HOLDER = """
import sys
from pilotfish.init.nslock import namespace_lock, LockError
try:
    with namespace_lock(float(sys.argv[1])) as what:
        print("held", what, flush=True)
        sys.stdin.read()
except LockError as err:
    print("busy", err, flush=True)
"""


def _take_lock(ns: str, wrap: list[str] | None = None, wait: float = 0.3) -> subprocess.Popen[str]:
    return subprocess.Popen(N.ns_argv(ns, [*(wrap or []), sys.executable, "-c", LOCK_HOLDER, str(wait)]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _first_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The first line `proc` prints, within `timeout` (its stdout read by a thread)."""
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, f"no line from {proc.args} within {timeout}s"
    return lines[0]


def test_the_lock_is_keyed_to_the_network_namespace() -> None:
    """Two processes in one namespace contend, also from different mount namespaces with their
    own /run; processes in different namespaces do not. The waiter names the holder's pid. A
    holder without CAP_NET_ADMIN (it cannot change the tables) is not waited for, so a local
    user cannot keep capture out by holding the lock."""
    names = [f"{N.NS_PREFIX}{os.getpid()}x{90000 + n}pod" for n in (1, 2)]
    for name in names:
        N.run(["ip", "netns", "add", name])
    try:
        holder = _take_lock(names[0])
        assert _first_line(holder).startswith("held"), "the first taker should hold the lock"
        same = _take_lock(names[0], OWN_RUN)
        other = _take_lock(names[1])
        same_out, other_out = same.communicate("", timeout=30)[0], other.communicate("", timeout=30)[0]
        assert same_out.startswith("busy"), f"same namespace (another mount namespace) did not contend: {same_out}"
        assert f"by pid {holder.pid} " in same_out, f"the holder is not named: {same_out}"
        assert other_out.startswith("held"), f"another namespace contended: {other_out}"
        holder.communicate("", timeout=30)
        again = _take_lock(names[0])
        assert again.communicate("", timeout=30)[0].startswith("held /proc/self/ns/net"), "released lock not free"

        unprivileged = subprocess.Popen(
            N.ns_argv(names[0], ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                                 "flock", "-x", "/proc/self/ns/net", "sh", "-c", "echo held; read x"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert _first_line(unprivileged).startswith("held"), "an unprivileged process can take the lock"
        capable = _take_lock(names[0], wait=5)
        out = capable.communicate("", timeout=30)[0]
        assert out.startswith("held nothing:") and "cannot change iptables rules" in out, out
        unprivileged.communicate("", timeout=30)
    finally:
        for name in names:
            N.delete_netns(name)


def test_a_rollback_never_removes_rules_it_did_not_write(backend: str, topo: Topology) -> None:
    """Another process adds a rule to the nat table between this run's commit and its failure:
    restoring the snapshot would delete that rule. The table is left alone and the error says so
    (it still holds this run's rules: the message must not claim the tables are as they were)."""
    N.seed_foreign_rules(topo, backend)
    proc = init(topo.pod, REDIRECT_V6, backend, "foreign-then-fail=4")
    assert proc.returncode == 1, show(proc)
    tables = N.exact_snapshot(topo.pod, backend)
    assert "-A OUTPUT -d 192.0.2.77/32 -j RETURN" in tables.v4, "the other writer's rule was removed" + show(proc)
    assert "changed by another process" in proc.stderr and "as they were" not in proc.stderr, show(proc)


# --------------------------------------------------------------------------------------------
# Item 8: killed half way, rerun with the same flags


PARTIAL = [
    pytest.param("kill-after-family=4", id="killed-after-ipv4"),
    pytest.param("skip-routes,kill-after-family=4", id="ipv4-only-no-routes"),
    pytest.param("kill-after-table=4", id="killed-between-ipv4-tables"),
    pytest.param("kill-after-routes", id="killed-after-routes"),
]


@pytest.mark.parametrize("hook", PARTIAL)
def test_rerun_completes_a_partial_install(backend: str, topo: Topology, tmp_path: Path, hook: str) -> None:
    """An init container killed half way (legacy commits table by table, every backend family by
    family) is rerun by kubelet with the same flags: the rerun must finish the install (our rules
    in some tables or families, routes missing) instead of refusing it as another configuration."""
    if hook.startswith("kill-after-table") and backend != "legacy":
        pytest.skip("nft commits a family in one transaction: no state between two tables")
    args = TPROXY_V6 + dns_args(tmp_path)
    N.seed_foreign_rules(topo, backend)
    killed = init(topo.pod, args, backend, hook)
    assert killed.returncode == -signal.SIGKILL, "the hook should have killed the run" + show(killed)
    expected = clean_install(backend, args)
    assert state(topo.pod, backend) != expected, "harness: the killed run left a complete install"
    proc = init(topo.pod, args, backend)
    assert proc.returncode == 0, "the rerun with the same flags must complete the install" + show(proc)
    assert_state(state(topo.pod, backend), expected, "after the rerun (expected: a clean install)", proc)


def test_partial_install_of_another_configuration_is_still_refused(backend: str, topo: Topology,
                                                                   tmp_path: Path) -> None:
    args = TPROXY_V6 + dns_args(tmp_path)
    other = with_flag(args, "-b", "8080")
    N.seed_foreign_rules(topo, backend)
    killed = init(topo.pod, args, backend, "kill-after-family=4")
    assert killed.returncode == -signal.SIGKILL, show(killed)
    partial = state(topo.pod, backend)
    proc = init(topo.pod, other, backend)
    assert proc.returncode == 1 and "--reconcile" in proc.stderr, show(proc)
    assert_state(state(topo.pod, backend), partial, "a refused run changed something", proc)
    proc = init(topo.pod, [*other, "--reconcile"], backend)
    assert proc.returncode == 0, show(proc)
    assert_state(state(topo.pod, backend), clean_install(backend, other), "after --reconcile", proc)


# --------------------------------------------------------------------------------------------
# Item 10: a failed apply leaves exactly what was there


def _disable_ipv6_on_lo(ns: str) -> None:
    N.run(N.ns_argv(ns, ["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]))


FAILURES = [
    # A real refusal: ::6 cannot be put on lo with IPv6 off there. No table existed before.
    pytest.param("", REDIRECT_V6, False, id="kernel-refuses-passthrough-address-no-tables"),
    pytest.param("fail-after-table=4", REDIRECT_V6, False, id="after-first-ipv4-table-no-tables"),
    pytest.param("fail-after-family=6", TPROXY_V6, False, id="after-both-families-no-tables"),
    pytest.param("fail-after-family=6", TPROXY_V6, True, id="after-both-families-foreign-tables"),
    pytest.param("fail-after-table=6", REDIRECT_V6, True, id="after-first-ipv6-table-foreign-tables"),
]


@pytest.mark.parametrize(("hook", "args", "seeded"), FAILURES)
def test_failed_apply_restores_exactly_what_was_there(backend: str, topo: Topology, hook: str,
                                                     args: list[str], seeded: bool) -> None:
    """iptables-save (both families), the policy routing and lo's addresses are the same before
    and after a failed apply, empty tables included: a table the run created is deleted again
    (nft). Legacy cannot delete a table, so there a table that did not exist before may remain,
    empty, and the error must say so rather than "the tables are as they were"."""
    if seeded:
        N.seed_foreign_rules(topo, backend)
    if not hook:
        _disable_ipv6_on_lo(topo.pod)
    before = state(topo.pod, backend)
    proc = init(topo.pod, args, backend, hook)
    assert proc.returncode == 1, show(proc)
    after = state(topo.pod, backend)
    assert after[1] == before[1], f"routing changed: {before[1]} -> {after[1]}" + show(proc)
    if backend == "legacy" and "remain, empty" in proc.stderr:
        assert "as they were" not in proc.stderr, show(proc)
        for family in ("v4", "v6"):
            old, new = tables_of(getattr(before[0], family)), tables_of(getattr(after[0], family))
            assert {t: new.get(t) for t in old} == old, f"{family}: a table that existed was not restored" + show(proc)
            for table in set(new) - set(old):
                assert all(line.startswith((f"*{table}", ":", "COMMIT")) and not line.endswith(" -")
                           for line in new[table].splitlines()), f"{family} {table} is not empty" + show(proc)
                assert f"ipv{family[1]} {table}" in proc.stderr, f"the error does not name {table}" + show(proc)
        return
    assert "rolled back: the tables are as they were before this run" in proc.stderr, show(proc)
    assert_state(after, before, "a failed apply did not restore exactly what was there", proc)


def tables_of(save: str) -> dict[str, str]:
    """An exact save split into its tables' blocks."""
    out: dict[str, str] = {}
    for block in save.split("COMMIT\n"):
        if block.strip():
            out[block.split()[0][1:]] = block + "COMMIT\n"
    return out
