#!/usr/bin/env python3
"""Sidecar benchmark: Istio's injected pod (`hello.yaml.injected`: the template's argv and
environment, uid 1337, read-only root) with `pilot-agent proxy sidecar` and Envoy, against
`pilotfish controlplane` in a peer network namespace (tests/pod_harness.py).

Measured, per fresh start of the istio-proxy container (capture installed, the control plane
already running, as on a node):
- start to ready: the agent's exec to the first 200 from /healthz/ready on 15020, polled from the
  peer namespace every 10 ms as kubelet's startup probe would (Envoy has CDS and LDS, is LIVE with
  workers started, the certificate is served);
- the parts of it: the same Envoy started alone on a static bootstrap, to its /ready (the floor
  Envoy itself sets; measured in the same run);
- idle: the agent's RSS (VmRSS) and CPU over IDLE_S seconds once ready, and Envoy's beside it.

Peers: Istio's pilot-agent cannot run here; the figures named are its users' reports — start to
ready 2-6 s, pilot-agent idle ~50 MB RSS (istio#38000) — and Envoy alone from the same run.

Root only (network namespaces). Run as `make bench` (`.venv/bin/python bench/sidecar_bench.py`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import git_commit, write_report

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "init")]  # the tests' pod and Envoy harnesses
import netns as N  # noqa: E402
from envoy_proc import Envoy  # noqa: E402
from pod_harness import Pod, ns_http  # noqa: E402

MESH = "services:\n  - {name: hello, namespace: default, clusterIP: 10.96.0.30, ports: [80]}\n"
ISTIO_START_TO_READY_S = (2.0, 6.0)  # users' reports (docs: BENCHMARKS.md "Sidecar")
ISTIO_AGENT_IDLE_RSS_MB = 50  # istio#38000
CLOCK_TICKS = 100


def wait_ready(pod: Pod, proxy: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """Seconds until /healthz/ready on 15020 answers 200, polled every 10 ms from the peer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise SystemExit(f"the agent exited {proxy.returncode}:\n{pod.log()[-3000:]}")
        try:
            if ns_http(pod.topo.peer, N.POD_V4, 15020, "/healthz/ready")[0] == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"not ready in {timeout} s:\n{pod.log()[-3000:]}")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def envoy_alone() -> float:
    """Seconds from exec to /ready LIVE of the wheel's Envoy on a minimal static bootstrap (its
    admin only), polled every 20 ms."""
    work = Path(tempfile.mkdtemp(prefix="pilotfish-bench-envoy-"))
    started = time.monotonic()
    envoy = Envoy(work, "", {"node": {"id": "bench", "cluster": "bench"},
                             "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}})
    try:
        envoy.wait_live()
        return time.monotonic() - started
    finally:
        envoy.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh starts of the istio-proxy container")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured after the last start")
    parser.add_argument("--quick", action="store_true", help="3 starts, 5 s idle")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.idle = 3, 5.0
    reason = N.skip_reason() or N.init_missing_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    print(f"pilotfish sidecar benchmark  commit {git_commit()}  {args.runs} starts, {args.idle:.0f} s idle")
    starts: list[float] = []
    alone: list[float] = []
    report: dict[str, object] = {}
    with N.topology() as topo:
        work = Path(tempfile.mkdtemp(prefix="pilotfish-bench-pod-"))
        pod = Pod(topo, work)
        try:
            pod.start_controlplane(MESH)
            root_pem = pod.root / "var/run/secrets/istio/root-cert.pem"
            deadline = time.monotonic() + 30
            while not (root_pem.exists() and root_pem.stat().st_size) and time.monotonic() < deadline:
                time.sleep(0.01)
            done = pod.init()
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            for run in range(args.runs):
                alone.append(envoy_alone())
                started = time.monotonic()
                proxy = pod.proxy()
                starts.append(wait_ready(pod, proxy) - started)
                print(f"  start {run + 1}: ready in {starts[-1] * 1000:6.0f} ms   (Envoy alone to /ready "
                      f"{alone[-1] * 1000:4.0f} ms)")
                if run < args.runs - 1:
                    proxy.terminate()
                    proxy.wait(timeout=60)
            envoys = children(proxy.pid)
            agent_cpu, envoy_cpu = cpu_s(proxy.pid), sum(cpu_s(p) for p in envoys)
            time.sleep(args.idle)  # the idle window itself is what is measured
            agent_cpu, envoy_cpu = cpu_s(proxy.pid) - agent_cpu, sum(cpu_s(p) for p in envoys) - envoy_cpu
            agent_rss, envoy_rss = rss_mb(proxy.pid), sum(rss_mb(p) for p in envoys)
            proxy.terminate()
            proxy.wait(timeout=60)
        finally:
            pod.stop()
            subprocess.run(["rm", "-rf", str(work)], check=False)
    median = statistics.median(starts)
    print(f"start to ready: median {median * 1000:.0f} ms (min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f});"
          f" Envoy alone {statistics.median(alone) * 1000:.0f} ms;"
          f" Istio users report {ISTIO_START_TO_READY_S[0]:.0f}-{ISTIO_START_TO_READY_S[1]:.0f} s "
          f"({median / ISTIO_START_TO_READY_S[0]:.2f}x the low end)")
    print(f"idle {args.idle:.0f} s: agent RSS {agent_rss:.1f} MiB ({agent_rss / ISTIO_AGENT_IDLE_RSS_MB:.2f}x "
          f"pilot-agent's ~{ISTIO_AGENT_IDLE_RSS_MB} MB), CPU {agent_cpu / args.idle * 100:.2f}% of a core; "
          f"Envoy RSS {envoy_rss:.1f} MiB, CPU {envoy_cpu / args.idle * 100:.2f}%")
    report.update(starts_s=starts, envoy_alone_s=alone, idle_s=args.idle, agent_rss_mib=agent_rss,
                  agent_cpu_s=agent_cpu, envoy_rss_mib=envoy_rss, envoy_cpu_s=envoy_cpu, commit=git_commit())
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
