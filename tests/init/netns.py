"""Real-network-namespace harness for the ``pilotfish init`` capture tests.

Why real namespaces: the value of ``pilotfish init`` is what the kernel does with its rules
(which connection lands on which socket, what ``SO_ORIGINAL_DST`` says, whether conntrack
un-NATs a DNS reply), and none of that can be asserted by comparing rule text. Every test gets
its own pair of namespaces, so rules, conntrack entries and ``ip rule``s never leak between
tests or onto the host.

Topology (one per test, names unique per process and call)::

    pod netns                              peer netns
    eth0 10.77.0.2/24, fd77::2/64  <--->   eth0 10.77.0.1/24, fd77::1/64
    default via 10.77.0.1 / fd77::1        lo   10.96.0.10/32, fd96::10/128  ("services")

The peer owns the service addresses, so traffic that is *not* captured really arrives there
and can be answered by a listener, which is how the tests prove "not redirected" positively
instead of by absence.

Processes run inside a namespace with ``ip netns exec NS setpriv --reuid=U --regid=G
--clear-groups``; the owner match of the capture rules is what the tests exercise, so the uid
of every probe is explicit. All waits are bounded by deadlines.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

HERE = Path(__file__).resolve().parent
PROBE = HERE / "nsprobe.py"
REPO = HERE.parent.parent

NS_PREFIX = "pfi"  # pilotfish-init test namespaces: pfi<pid>x<n>{pod,peer}

POD_V4, PEER_V4 = "10.77.0.2", "10.77.0.1"
POD_V6, PEER_V6 = "fd77::2", "fd77::1"
SVC_V4, SVC_V6 = "10.96.0.10", "fd96::10"

APP_UID = 1000  # an ordinary application user: its traffic must be captured
PROXY_UID = 1337  # the proxy (-u 1337): its traffic must never be captured

BACKENDS = ("legacy", "nft")

_counter = itertools.count()


class HarnessError(RuntimeError):
    """A harness step failed (not the code under test); the message carries the command output."""


# --------------------------------------------------------------------------------------------
# Commands


def run(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
        input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; on failure raise with its stdout/stderr in the message."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          input=input, env=env)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)!r} exited {proc.returncode}\n"
                           f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def ns_argv(ns: str, argv: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
    """argv that runs ``argv`` inside netns ``ns``, as uid/gid if given (supplementary groups
    cleared, so ``--gid-owner`` matches only what we intend)."""
    return ["ip", "netns", "exec", ns, *as_user(argv, uid, gid)]


def as_user(argv: Sequence[str], uid: int | None = None, gid: int | None = None) -> list[str]:
    """argv that runs ``argv`` as uid/gid (unchanged if uid is None)."""
    if uid is None:
        return list(argv)
    return ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
            "--clear-groups", *argv]


_probe_python: str | None = None


def probe_python() -> str:
    """Interpreter for the probes, runnable by an unprivileged uid.

    Prefer the test's own interpreter (the project venv). Some machines keep the venv's base
    interpreter under ``/root`` (pyenv), which uid 1000 cannot execute; then fall back to the
    system ``python3``. The probes are stdlib-only, so either works.
    """
    global _probe_python
    if _probe_python is None:
        candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
        for cand in candidates:
            if not cand:
                continue
            ok = subprocess.run(as_user([cand, "-c", "import json, socket"], APP_UID),
                                capture_output=True, timeout=30).returncode == 0
            if ok:
                _probe_python = cand
                break
        else:
            raise HarnessError("no Python interpreter is executable by uid 1000")
    return _probe_python


def probe_argv(*args: str) -> list[str]:
    return [probe_python(), str(PROBE), *args]


# --------------------------------------------------------------------------------------------
# Background processes (listeners)


@dataclass
class Proc:
    """A long-running probe inside a namespace whose JSON-line stdout is read by a thread.

    The reader thread keeps the pipe drained (a full pipe would block the probe) and queues the
    parsed events, so the test can wait for one with a deadline.
    """

    name: str
    popen: subprocess.Popen[str] = field(repr=False)
    events: "queue.Queue[dict[str, Any]]" = field(default_factory=queue.Queue, repr=False)
    seen: list[dict[str, Any]] = field(default_factory=list, repr=False)
    raw: list[str] = field(default_factory=list, repr=False)

    def start_reader(self) -> None:
        def reader() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                self.raw.append(line)
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    pass
        threading.Thread(target=reader, name=f"reader-{self.name}", daemon=True).start()

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """Return the first event (already seen or new) that satisfies ``pred``."""
        for ev in self.seen:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{self.name}: no matching event within {timeout}s; "
                                   f"seen={self.seen}; {self.diagnostics()}")
            try:
                ev = self.events.get(timeout=min(left, 0.05))
            except queue.Empty:
                if self.popen.poll() is not None and self.events.empty():
                    raise HarnessError(f"{self.name} exited {self.popen.returncode} early; "
                                       f"{self.diagnostics()}") from None
                continue
            self.seen.append(ev)
            if pred(ev):
                return ev

    def drain(self, settle: float = 0.0) -> list[dict[str, Any]]:
        """All events so far (waiting ``settle`` seconds for stragglers)."""
        deadline = time.monotonic() + settle
        while True:
            try:
                self.seen.append(self.events.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                return list(self.seen)

    def accepted(self, settle: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.drain(settle) if e.get("event") in ("accept", "query")]

    def diagnostics(self) -> str:
        err = ""
        if self.popen.poll() is not None and self.popen.stderr is not None:
            err = self.popen.stderr.read()
        return f"stdout={''.join(self.raw)!r} stderr={err!r}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=2)


# --------------------------------------------------------------------------------------------
# Topology


@dataclass
class Topology:
    """A pod namespace and a peer namespace joined by a veth pair (see the module docstring)."""

    pod: str
    peer: str
    procs: list[Proc] = field(default_factory=list, repr=False)

    # -- generic execution ------------------------------------------------------------------

    def run(self, ns: str, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None,
            timeout: float = 30.0, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run(ns_argv(ns, argv, uid, gid), timeout=timeout, check=check, env=env)

    def spawn(self, ns: str, argv: Sequence[str], *, uid: int | None = None,
              gid: int | None = None, name: str = "") -> Proc:
        popen = subprocess.Popen(ns_argv(ns, argv, uid, gid), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, bufsize=1)
        proc = Proc(name or " ".join(argv[-6:]), popen)
        proc.start_reader()
        self.procs.append(proc)
        return proc

    # -- probes -------------------------------------------------------------------------------

    def tcp_listener(self, ns: str, host: str, port: int, *, uid: int = 0, gid: int | None = None,
                     tag: str = "", transparent: bool = False, timeout: float = 5.0) -> Proc:
        """Start a TCP listener and wait until it is bound (its "ready" line)."""
        args = ["tcp-listen", "--host", host, "--port", str(port), "--tag", tag or f"{host}:{port}"]
        if transparent:
            args.append("--transparent")
        proc = self.spawn(ns, probe_argv(*args), uid=uid, gid=gid, name=f"tcp-listen {tag or port}@{ns}")
        proc.wait_event(lambda e: e.get("event") == "ready", timeout)
        return proc

    def dns_listener(self, ns: str, host: str, port: int, answer: str, *, uid: int = 0,
                     gid: int | None = None, tag: str = "", udp: bool = True, tcp: bool = True,
                     timeout: float = 5.0) -> Proc:
        """Start a UDP+TCP DNS server that answers every query with ``answer``."""
        args = ["dns-listen", "--host", host, "--port", str(port), "--answer", answer,
                "--tag", tag or f"dns {host}:{port}"]
        if not udp:
            args.append("--no-udp")
        if not tcp:
            args.append("--no-tcp")
        proc = self.spawn(ns, probe_argv(*args), uid=uid, gid=gid, name=f"dns-listen {tag or port}@{ns}")
        proc.wait_event(lambda e: e.get("event") == "ready", timeout)
        return proc

    def tcp_connect(self, ns: str, host: str, port: int, *, uid: int, gid: int | None = None,
                    bind: str = "", timeout: float = 3.0) -> dict[str, Any]:
        """Connect from ``uid`` (optionally from source address ``bind``) and return the client's
        result (``reply`` = what the listener saw)."""
        proc = self.run(ns, probe_argv("tcp-connect", "--host", host, "--port", str(port),
                                       "--timeout", str(timeout), "--bind", bind),
                        uid=uid, gid=gid, timeout=timeout + 10, check=False)
        return _last_json(proc)

    def dns_query(self, ns: str, server: str, *, uid: int, gid: int | None = None,
                  proto: str = "udp", aaaa: bool = False, name: str = "probe.example.com",
                  timeout: float = 2.0) -> dict[str, Any]:
        args = ["dns-query", "--server", server, "--proto", proto, "--name", name,
                "--timeout", str(timeout)]
        if aaaa:
            args.append("--aaaa")
        proc = self.run(ns, probe_argv(*args), uid=uid, gid=gid, timeout=timeout + 10, check=False)
        return _last_json(proc)

    # -- state --------------------------------------------------------------------------------

    def snapshot(self, backend: str, ns: str | None = None) -> "Snapshot":
        return snapshot(ns or self.pod, backend)

    def ip(self, *args: str, ns: str | None = None) -> str:
        return self.run(ns or self.pod, ["ip", *args]).stdout

    def stop_procs(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {"ok": False, "error": f"probe printed no result (exit {proc.returncode}); "
                                  f"stdout={proc.stdout!r} stderr={proc.stderr!r}"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(name: str) -> None:
    """Delete a test namespace after ending the processes still inside it.

    Deleting a netns that still has processes only unlinks its name; the processes (and with
    them the veth, rules and sockets) would live on. Everything inside these namespaces was
    started by this harness, so ending those pids is ending our own processes.
    """
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 2
    while pids and time.monotonic() < deadline and any(_alive(int(p)) for p in pids if p.isdigit()):
        time.sleep(0.01)
    run(["ip", "netns", "del", name], check=False)


def reap_stale_namespaces() -> None:
    """Remove namespaces left by an earlier test process of ours that died (e.g. SIGKILL).

    Only names with our prefix whose embedded pid is no longer alive are touched.
    """
    for name in list_netns():
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)x\d+(pod|peer)", name)
        if m and not _alive(int(m.group(1))):
            delete_netns(name)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """Create the pod/peer pair; always delete both namespaces afterwards, even on failure."""
    base = f"{NS_PREFIX}{os.getpid()}x{next(_counter)}"
    topo = Topology(pod=f"{base}pod", peer=f"{base}peer")
    try:
        for ns in (topo.pod, topo.peer):
            run(["ip", "netns", "add", ns])
            # No duplicate address detection: a tentative address cannot be bound or used as a
            # source, and waiting for DAD would cost ~1-2 s per test.
            run(ns_argv(ns, ["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                             "net.ipv6.conf.default.accept_dad=0"]))
        # Both ends are called eth0, created directly inside their namespaces (no host clash).
        run(["ip", "link", "add", "eth0", "netns", topo.pod, "type", "veth",
             "peer", "name", "eth0", "netns", topo.peer])
        run(["ip", "-n", topo.pod, "-batch", "-"], input="\n".join([
            "link set lo up",
            f"addr add {POD_V4}/24 dev eth0",
            f"addr add {POD_V6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {PEER_V4} dev eth0",
            f"route add default via {PEER_V6} dev eth0",
        ]) + "\n")
        run(["ip", "-n", topo.peer, "-batch", "-"], input="\n".join([
            "link set lo up",
            f"addr add {SVC_V4}/32 dev lo",
            f"addr add {SVC_V6}/128 dev lo nodad",
            f"addr add {PEER_V4}/24 dev eth0",
            f"addr add {PEER_V6}/64 dev eth0 nodad",
            "link set eth0 up",
        ]) + "\n")
        wait_link_ready(topo)
        yield topo
    finally:
        topo.stop_procs()
        for ns in (topo.pod, topo.peer):
            delete_netns(ns)


def wait_link_ready(topo: Topology, timeout: float = 5.0) -> None:
    """Wait until the veth carrier is up on both ends (bounded poll, a few ms per step)."""
    deadline = time.monotonic() + timeout
    while True:
        states = [run(["ip", "-n", ns, "-o", "link", "show", "eth0"]).stdout for ns in (topo.pod, topo.peer)]
        if all("LOWER_UP" in s for s in states):
            return
        if time.monotonic() > deadline:
            raise HarnessError(f"veth did not come up: {states}")
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------
# iptables state snapshots


@dataclass(frozen=True)
class Snapshot:
    """Normalised ``iptables-save`` + ``ip6tables-save`` output of one backend in one netns.

    Comment lines (timestamps, "legacy tables present" warnings) and counters are removed, and
    tables that hold nothing (only built-in chains, policy ACCEPT, no rules) are dropped: merely
    *listing* a table instantiates it (legacy) or leaves an empty nft table behind, which is
    not a change anyone can observe in the data path.
    """

    v4: str
    v6: str

    def __str__(self) -> str:
        return f"--- v4 ---\n{self.v4}--- v6 ---\n{self.v6}"

    def has(self, rule: str, v6: bool = False) -> bool:
        return rule in (self.v6 if v6 else self.v4).splitlines()

    @property
    def empty(self) -> bool:
        return not self.v4 and not self.v6


def snapshot_diff(expected: Snapshot, actual: Snapshot) -> str:
    """Unified diff of two snapshots (what a failing comparison should show, not two dumps)."""
    lines = difflib.unified_diff(str(expected).splitlines(), str(actual).splitlines(),
                                 "expected", "actual", lineterm="", n=2)
    return "\n".join(lines)


_BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def normalise_save(text: str) -> str:
    out: list[str] = []
    table: list[str] = []
    interesting = False
    for line in text.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table, interesting = [line], False
            continue
        if line == "COMMIT":
            if interesting:
                out.extend(table + ["COMMIT"])
            table = []
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            chain, policy = parts[0], parts[1] if len(parts) > 1 else "-"
            line = f":{chain} {policy}"
            if chain not in _BUILTIN or policy != "ACCEPT":
                interesting = True
        else:
            line = re.sub(r"^\[\d+:\d+\] ", "", line)
            interesting = True
        table.append(line)
    return "".join(f"{line}\n" for line in out)


def save_binaries(backend: str) -> tuple[str, str]:
    return f"iptables-{backend}-save", f"ip6tables-{backend}-save"


def iptables_binaries(backend: str) -> tuple[str, str]:
    return f"iptables-{backend}", f"ip6tables-{backend}"


def snapshot(ns: str, backend: str) -> Snapshot:
    v4bin, v6bin = save_binaries(backend)
    return Snapshot(normalise_save(run(ns_argv(ns, [v4bin])).stdout),
                    normalise_save(run(ns_argv(ns, [v6bin])).stdout))


def exact_save(text: str) -> str:
    """iptables-save output as it is, but for the comment lines (a timestamp) and the counters
    (traffic): empty tables and chains stay, so a table created by a run shows."""
    lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")]
    return "".join(f"{line}\n" for line in lines)


def exact_snapshot(ns: str, backend: str) -> Snapshot:
    """Both families' tables of one backend, with nothing dropped but comments and counters."""
    v4bin, v6bin = save_binaries(backend)
    return Snapshot(exact_save(run(ns_argv(ns, [v4bin])).stdout), exact_save(run(ns_argv(ns, [v6bin])).stdout))


def routing(ns: str) -> dict[str, str]:
    """What pilotfish init may change outside iptables: policy rules, the TPROXY route table,
    the addresses on lo."""
    def ip(*args: str) -> str:
        return run(ns_argv(ns, ["ip", *args]), check=False).stdout

    return {"rules4": ip("rule", "show"), "rules6": ip("-6", "rule", "show"),
            "table133v4": ip("route", "show", "table", "133"), "table133v6": ip("-6", "route", "show", "table", "133"),
            "lo": ip("-o", "addr", "show", "dev", "lo")}


def seed_foreign_rules(topo: Topology, backend: str) -> None:
    """Install rules that are not ours, in the backend under test, in both families.

    Cleanup and reconcile must remove exactly what pilotfish installed; these prove that a
    foreign rule in a built-in chain (where our jumps also live), a foreign chain in nat, and a
    rule in filter (where reconcile's guardrails go) all survive.
    """
    v4, v6 = iptables_binaries(backend)
    for binary, doc_net, fam in ((v4, "192.0.2.1", 4), (v6, "2001:db8::1", 6)):
        for args in (
            ["-t", "nat", "-A", "OUTPUT", "-d", doc_net, "-j", "RETURN"],
            ["-t", "nat", "-N", "FOREIGN_CHAIN"],
            ["-t", "nat", "-A", "FOREIGN_CHAIN", "-p", "udp", "--dport", "9999", "-j", "RETURN"],
            ["-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "FOREIGN_CHAIN"],
            ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "ACCEPT"],
            ["-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"],
        ):
            topo.run(topo.pod, [binary, *args])


# --------------------------------------------------------------------------------------------
# Environment checks


def skip_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and installs iptables rules)"
    for tool in ("ip", "setpriv", "capsh"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found on PATH"
    probe = f"{NS_PREFIX}{os.getpid()}x999999pod"
    try:
        res = run(["ip", "netns", "add", probe], check=False, timeout=10)
        if res.returncode != 0:
            return f"'ip netns add' does not work here: {res.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False, timeout=10)
    return None


def backend_skip_reason(backend: str) -> str | None:
    """Why one iptables backend is unusable here (missing binaries or kernel support), or None."""
    bins = [*iptables_binaries(backend), *save_binaries(backend)]
    missing = [b for b in bins if shutil.which(b) is None]
    if missing:
        return f"{backend} backend: {', '.join(missing)} not installed (apt-get install iptables)"
    probe = f"{NS_PREFIX}{os.getpid()}x99999{BACKENDS.index(backend)}pod"
    try:
        run(["ip", "netns", "add", probe], timeout=10)
        for binary in iptables_binaries(backend):
            res = run(ns_argv(probe, [binary, "-t", "nat", "-A", "OUTPUT", "-p", "255", "-j", "RETURN"]),
                      check=False, timeout=10)
            if res.returncode != 0:
                return f"{backend} backend unusable in this kernel: {binary}: {res.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False, timeout=10)
    return None


# --------------------------------------------------------------------------------------------
# pilotfish init


def pilotfish_bin() -> str:
    """The ``pilotfish`` executable: $PILOTFISH_BIN, else the one next to this interpreter."""
    env = os.environ.get("PILOTFISH_BIN")
    if env:
        return env
    cand = Path(sys.executable).with_name("pilotfish")
    if cand.exists():
        return str(cand)
    return str(REPO / ".venv" / "bin" / "pilotfish")


def init_missing_reason() -> str | None:
    """Skip reason while ``pilotfish init`` has not landed (the subcommand does not exist)."""
    try:
        res = run([pilotfish_bin(), "init", "--help"], check=False, timeout=60)
    except FileNotFoundError:
        return f"{pilotfish_bin()} does not exist (run 'make venv')"
    if res.returncode != 0 and "invalid choice" in res.stderr:
        return f"'pilotfish init' is not available yet: {res.stderr.strip().splitlines()[-1]}"
    return None
