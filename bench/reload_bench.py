#!/usr/bin/env python3
"""Reload benchmark: what a large NameTable reload costs the table being served (issue 7 item 19).

Run as `.venv/bin/python bench/reload_bench.py` (about 3 minutes with the default sizes). For each
size (100k, 500k, 1M Kubernetes services by default):

1. Writes two table files of that size, A and B, which give `svc-0.ns-0.svc.cluster.local` (and
   every other name) different addresses, so each reply tells which table answered it.
2. `file` path: starts `pilotfish dns --name-table A` and waits until it answers. A client in
   this process sends one UDP query every `--interval` ms (an open loop: a stalled server does not
   slow the sending down) and records every reply's latency. Then the file is replaced by B and
   SIGHUP sent; the run ends when the first reply from B arrived and the log says the table was
   installed, plus `--tail` seconds.
3. `nds` path (the agent's): the same, but the table arrives as the bytes of a NameTable in a
   child process that serves with `DnsProxy` and calls `set_table(bytes)` from another thread, as
   the agent's xDS thread does. `nds-message` is the same with the message decoded first
   (`set_table(NameTable.FromString(bytes))`), which is what xds_client/nds.py does today:
   protobuf's decoding is one C call that holds the GIL (`--paths file,nds,nds-message`).

Figures per size and path:
- reload: seconds from SIGHUP (or the push) to the first reply from the new table, and the build
  time the proxy logged;
- queries sent from the reload's start to `--tail` seconds after the swap (the replaced table is
  freed then) and their latency: p50, p99, worst, how many waited over 100 ms and over 1 s, and
  how many got no reply within 5 s;
- whether any reply after the first new one came from the old table (must be 0);
- memory: VmHWM (peak RSS) of the serving process, VmRSS before and after the reload.

`--json PATH` writes every raw figure; `--sizes 100000` runs one size; `--quick` is a smoke run
(20k services).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import git_commit, pilotfish_exe, write_report

PROXY_NS = "ns-0"
SEARCH = ("ns-0.svc.cluster.local", "svc.cluster.local", "cluster.local")
PER_NS = 100  # services per namespace
PROBE = "svc-0.ns-0.svc.cluster.local"
LOST_AFTER = 5.0  # seconds without a reply: counted as lost


def ip_of(i: int, table: int) -> str:
    return f"{10 + table}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def write_table(path: Path, n: int, table: int) -> None:
    """A NameTable JSON file of n Kubernetes services, written in pieces (1M is ~140 MB)."""
    with open(path, "w") as f:
        f.write('{"table": {')
        for i in range(n):
            ns, svc = f"ns-{i // PER_NS}", f"svc-{i % PER_NS}"
            f.write(f'{"," if i else ""}"{svc}.{ns}.svc.cluster.local": {{"ips": ["{ip_of(i, table)}"], '
                    f'"registry": "Kubernetes", "shortname": "{svc}", "namespace": "{ns}"}}')
        f.write("}}")


def write_message(path: Path, n: int, table: int) -> None:
    """The same table as a serialized NameTable (what NDS pushes)."""
    from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

    message = NameTable()
    entries = message.table
    for i in range(n):
        ns, svc = f"ns-{i // PER_NS}", f"svc-{i % PER_NS}"
        entry = entries[f"{svc}.{ns}.svc.cluster.local"]
        entry.ips.append(ip_of(i, table))
        entry.registry, entry.shortname, entry.namespace = "Kubernetes", svc, ns
    path.write_bytes(message.SerializeToString())


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def question(qid: int) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in PROBE.split(".")) + b"\0"
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x01\x00\x01"


@dataclass
class Probe:
    """An open-loop client: one query every `interval` s, replies matched by ID."""

    port: int
    interval: float
    sent: dict[int, float] = field(default_factory=dict)  # id -> send time
    replies: dict[int, tuple[float, bytes]] = field(default_factory=dict)  # id -> (time, last 4 bytes)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        qid = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            qid = (qid + 1) & 0xFFFF
            self.sent[qid] = time.monotonic()
            try:
                self.sock.send(question(qid))
            except OSError:
                pass
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def _receive(self) -> None:
        while not self._stop.is_set() or len(self.replies) < len(self.sent):
            try:
                data = self.sock.recv(512)
            except (TimeoutError, OSError):
                if self._stop.is_set():
                    return
                continue
            self.replies[int.from_bytes(data[:2], "big")] = (time.monotonic(), data[-4:])

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(LOST_AFTER + 1)
        self.sock.close()

    def first_from(self, rdata: bytes, after: float) -> float | None:
        times = [t for t, r in self.replies.values() if r == rdata and t >= after]
        return min(times) if times else None


def latency_figures(probe: Probe, start: float, end: float, new: bytes) -> dict:
    """Latency of the queries sent in [start, end]."""
    lat, lost = [], 0
    for qid, sent in probe.sent.items():
        if not start <= sent <= end:
            continue
        got = probe.replies.get(qid)
        if got is None:
            lost += 1
        else:
            lat.append(got[0] - sent)
    first_new = probe.first_from(new, start)
    back_to_old = sum(1 for t, r in probe.replies.values() if first_new and t > first_new and r != new)
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000) if lat else (lambda q: None)
    return {
        "queries": len(lat) + lost,
        "lost": lost,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "worst_ms": lat[-1] * 1000 if lat else None,
        "over_100ms": sum(1 for x in lat if x > 0.1),
        "over_1s": sum(1 for x in lat if x > 1.0),
        "old_after_new": back_to_old,
    }


def wait_answering(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(question(1), ("127.0.0.1", port))
            try:
                if s.recv(512):
                    return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"no answer on port {port} within {timeout}s")


def free_port() -> int:
    """Bound by the server itself is better, but `pilotfish dns` is told its port: ask the
    kernel for one free for UDP and TCP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port")


def run_reload(work: Path, n: int, path_kind: str, interval: float, tail: float, timeout: float) -> dict:
    """One reload of a table of n services over `path_kind` ('file' or 'nds'); its figures."""
    port = free_port()
    log_path = work / f"{path_kind}-{n}.log"
    resolv = work / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\nsearch {' '.join(SEARCH)}\n")
    if path_kind == "file":
        table = work / f"table-{n}.json"
        write_table(table, n, 0)
        argv = [pilotfish_exe(), "dns", "--name-table", str(table), "--listen", f"127.0.0.1:{port}",
                "--resolv-conf", str(resolv), "--upstream", "127.0.0.1:9", "--proxy-namespace", PROXY_NS]
        write_table(work / "next.json", n, 1)
    else:
        for which in (0, 1):
            write_message(work / f"message-{which}.pb", n, which)
        argv = [sys.executable, str(Path(__file__).resolve()), "--nds-child", path_kind, str(port), str(work)]
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_answering(port, timeout)
            start_s = time.monotonic() - started
            rss_before = status_kib(proc.pid, "VmRSS")
            hwm_start = status_kib(proc.pid, "VmHWM")
            probe = Probe(port, interval)
            probe.start()
            time.sleep(1.0)  # steady state first
            mark = len(log_path.read_bytes())
            old, new = socket.inet_aton(ip_of(0, 0)), socket.inet_aton(ip_of(0, 1))
            if path_kind == "file":
                os.replace(work / "next.json", table)
                t_reload = time.monotonic()
                proc.send_signal(signal.SIGHUP)
            else:
                t_reload = time.monotonic()
                assert proc.stdin is not None
                proc.stdin.write(b"push\n")
                proc.stdin.flush()
            deadline = t_reload + timeout
            first_new = None
            while time.monotonic() < deadline:
                first_new = probe.first_from(new, t_reload)
                if first_new is not None and b"installed" in log_path.read_bytes()[mark:]:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            if first_new is None:
                raise RuntimeError(f"no reply from the new table within {timeout}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(tail)  # the replaced table is freed after the swap: measured too
            end = time.monotonic()
            probe.stop()
            logged = log_path.read_text(errors="replace")[mark:]
            built = [line for line in logged.splitlines() if "installed" in line or "reload" in line]
            out = {
                "services": n,
                "path": path_kind,
                "start_s": start_s,
                "reload_s": first_new - t_reload,
                "log": built,
                **latency_figures(probe, t_reload, end, new),
                "baseline_before_reload": latency_figures(probe, t_reload - 1.0, t_reload, old),
                "rss_mib_before": (rss_before or 0) / 1024,
                "rss_mib_after": (status_kib(proc.pid, "VmRSS") or 0) / 1024,
                "hwm_mib_after_start": (hwm_start or 0) / 1024,
                "hwm_mib": (status_kib(proc.pid, "VmHWM") or 0) / 1024,
            }
            return out
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def nds_child(kind: str, port: int, work: Path) -> None:
    """The agent's path without a control plane: serve message-0, and on `push` on stdin build
    message-1 from another thread (the agent builds on grpc's thread), from its bytes (`nds`) or
    from the decoded message (`nds-message`)."""
    import logging

    import trio

    from pilotfish.dns.config import DnsConfig
    from pilotfish.dns.server import DnsProxy
    from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    proxy = DnsProxy(DnsConfig(listen=(("127.0.0.1", port),), search=SEARCH, proxy_namespace=PROXY_NS,
                               proxy_domain=f"{PROXY_NS}.svc.cluster.local"))
    proxy.set_table(NameTable.FromString((work / "message-0.pb").read_bytes()))

    def push() -> None:
        sys.stdin.readline()
        data = (work / "message-1.pb").read_bytes()
        proxy.set_table(data if kind == "nds" else NameTable.FromString(data))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            await trio.to_thread.run_sync(push)
            await trio.sleep_forever()

    trio.run(main)


def fmt(v: float | None, spec: str = "{:.0f}") -> str:
    return "-" if v is None else spec.format(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,500000,1000000", help="services per table")
    ap.add_argument("--paths", default="file,nds,nds-message",
                    help="file (pilotfish dns, SIGHUP), nds (agent, bytes), nds-message (agent, decoded)")
    ap.add_argument("--interval", type=float, default=2.0, help="ms between probe queries (default 2)")
    ap.add_argument("--tail", type=float, default=1.0, help="seconds measured after the swap")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per start or reload")
    ap.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20k services")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--nds-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nds_child:
        nds_child(args.nds_child[0], int(args.nds_child[1]), Path(args.nds_child[2]))
        return 0
    sizes = [20000] if args.quick else [int(s) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    report: dict = {
        "commit": git_commit("dns", "bench"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "interval_ms": args.interval,
        "runs": [],
    }
    work = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    print(f"commit {report['commit']}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"probe every {args.interval:g} ms")
    print(f"{'services':>9} {'path':>11} {'reload s':>8} {'queries':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'worst ms':>8} {'>100ms':>6} {'>1s':>4} {'lost':>4} {'old after':>9} {'peak RSS':>9} {'RSS after':>9}")
    try:
        for n in sizes:
            for kind in paths:
                r = run_reload(work, n, kind, args.interval / 1000, args.tail, args.timeout)
                report["runs"].append(r)
                print(f"{n:>9} {kind:>11} {r['reload_s']:>8.2f} {r['queries']:>7} {fmt(r['p50_ms'], '{:.2f}'):>7} "
                      f"{fmt(r['p99_ms'], '{:.1f}'):>7} {fmt(r['worst_ms'], '{:.1f}'):>8} {r['over_100ms']:>6} "
                      f"{r['over_1s']:>4} {r['lost']:>4} {r['old_after_new']:>9} {r['hwm_mib']:>7.0f} M "
                      f"{r['rss_mib_after']:>7.0f} M", flush=True)
                for line in r["log"]:
                    print("          " + line.split("\t")[-1] if "\t" in line else "          " + line)
    finally:
        if not args.keep:
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
        else:
            print(f"work directory kept: {work}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
