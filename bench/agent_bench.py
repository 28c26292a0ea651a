#!/usr/bin/env python3
"""Agent benchmark: from a control-plane push to the new name answering in the agent's DNS
proxy, and the agent's memory, for NameTables of 1,000 / 10,000 / 100,000 services.

Run as `make bench` (after the DNS and init benchmarks) or `.venv/bin/python bench/agent_bench.py`.

The control plane is pilotfish's own ADS server (controlplane/ads.py) started in this process
with TLS; its table is prebuilt, so the figure is the push path only (serialize and send, the
agent's receive, decode, ACK, lookup-table build and swap, saving the table to disk), not the
parsing of a mesh file. The agent is the real `pilotfish agent` process. For each size:
1. start the agent, wait until the first table answers;
2. five times: publish a table with one name more, and time until that name resolves (polling
   the agent's UDP port every millisecond);
3. the agent's VmRSS and VmHWM with the table loaded.
Istio's agent cannot run here; its table-build figures measured earlier on this machine are
printed for orientation (not the same run).

`--sizes 1000,10000`, `--pushes 5`, `--json PATH`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TypedDict

import grpc
from benchlib import git_commit, med, pilotfish_exe, write_report
from dnslib import DNSRecord

from pilotfish.controlplane.ads import AdsServicer, MeshHub, start_server
from pilotfish.controlplane.ca import cert_pem, issue_serving, key_pem, new_key, new_root, serving_names
from pilotfish.controlplane.envoyconfig import SidecarConfig, sidecar_config
from pilotfish.controlplane.mesh import parse_mesh
from pilotfish.controlplane.nametable import ProxyInfo
from pilotfish.controlplane.served import Snapshot
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

SERVICES_PER_NS = 100
TARGET_10K_S = 0.300
TARGET_RSS_MIB = 60
# Istio's table build, s and MiB (docs/istio-compat.md "Measured figures").
ISTIO_BUILD = {1000: (0.0054, 10.2), 10000: (0.113, 33.6), 100000: (1.23, 218.0)}


def table(n: int, extra: int = 0) -> NameTable:
    """n Kubernetes services (4-5 names each in the agent) plus `extra` marker services."""
    out = NameTable()
    for i in range(n):
        ns, svc = f"ns-{i // SERVICES_PER_NS}", f"svc-{i % SERVICES_PER_NS}"
        entry = out.table[f"{svc}.{ns}.svc.cluster.local"]
        entry.ips.append(f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}")
        entry.registry, entry.shortname, entry.namespace = "Kubernetes", svc, ns
    for k in range(extra):
        entry = out.table[f"push-{k}.ns-0.svc.cluster.local"]
        entry.ips.append(f"10.250.0.{k + 1}")
        entry.registry, entry.shortname, entry.namespace = "Kubernetes", f"push-{k}", "ns-0"
    return out


def resolves(port: int, name: str, want: str) -> bool:
    try:
        raw = DNSRecord.question(name).send("127.0.0.1", port, timeout=0.05)
    except (socket.timeout, OSError):
        return False
    return [str(rr.rdata) for rr in DNSRecord.parse(raw).rr] == [want]


def wait_resolves(port: int, name: str, want: str, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if resolves(port, name, want):
            return time.perf_counter() - started
        time.sleep(0.001)
    raise RuntimeError(f"{name} did not resolve to {want} within {timeout}s")


def status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Result(TypedDict):
    """One table size's figures (also the JSON report's rows)."""

    services: int
    first_table_s: float
    push_s: list[float]
    push_median_s: float
    rss_mib: float
    hwm_mib: float
    table_bytes: int


def capture_only(proxy: ProxyInfo) -> SidecarConfig:
    """The Envoy config of a mesh without services (the agent asks for no Envoy resource)."""
    return sidecar_config(parse_mesh(""), proxy)


def measure(n: int, pushes: int, credentials: grpc.ServerCredentials, root_pem: bytes) -> Result:
    tables = [table(n, k) for k in range(pushes + 1)]
    hub = MeshHub(Snapshot("v0", lambda proxy: tables[0], n, capture_only))
    server, port = start_server(AdsServicer(hub), "127.0.0.1:0", credentials)
    work = Path(tempfile.mkdtemp(prefix="pilotfish-agentbench-"))
    (work / "var/run/secrets/istio").mkdir(parents=True)
    (work / "var/run/secrets/istio/root-cert.pem").write_bytes(root_pem)
    (work / "resolv.conf").write_text("nameserver 127.0.0.1\nsearch ns-0.svc.cluster.local svc.cluster.local cluster.local\n")
    dns_port = free_port()
    env = {**os.environ, "POD_NAME": "bench", "POD_NAMESPACE": "ns-0", "ISTIO_META_DNS_CAPTURE": "true",
           "PILOT_DISCOVERY_ADDRESS": f"localhost:{port}"}
    agent = subprocess.Popen(
        [pilotfish_exe(), "--log-level", "warning", "agent", "--listen", f"127.0.0.1:{dns_port}",
         "--status-port", str(free_port()), "--resolv-conf", str(work / "resolv.conf")],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        first = wait_resolves(dns_port, "svc-1.ns-0.svc.cluster.local", "10.96.0.1", timeout=120)
        times = []
        for k in range(1, pushes + 1):
            time.sleep(0.3)  # let the previous table's save and ACK finish
            started = time.perf_counter()
            hub.publish(Snapshot(f"v{k}", lambda proxy, t=tables[k]: t, n + k, capture_only))
            wait_resolves(dns_port, f"push-{k - 1}.ns-0.svc.cluster.local", f"10.250.0.{k}", timeout=120)
            times.append(time.perf_counter() - started)
        rss, hwm = status_mib(agent.pid, "VmRSS"), status_mib(agent.pid, "VmHWM")
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=20)
        server.stop(0)
    if agent.returncode not in (0, -15):
        raise RuntimeError(f"agent exited {agent.returncode}: {err.decode()[-2000:]}")
    return {"services": n, "first_table_s": first, "push_s": times, "push_median_s": statistics.median(times),
            "rss_mib": rss, "hwm_mib": hwm, "table_bytes": len(tables[0].SerializeToString())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    now = datetime.now(timezone.utc)
    ca = new_root(new_key(), now)
    key = new_key()
    credentials = grpc.ssl_server_credentials([(key_pem(key), cert_pem(issue_serving(ca, key, serving_names(), now)))])
    print(f"pilotfish agent benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %z')}  commit {git_commit('agent', 'dns', 'xds_client')}"
          f"  {os.cpu_count()} CPUs")
    print("push -> answer: from publishing a table with one name more to that name resolving in the agent "
          f"(median of {args.pushes}); RSS/HWM: the agent process with the table loaded")
    print(f"{'services':>9} {'table':>9} {'first table':>12} {'push->answer':>13} {'min-max':>16} {'RSS':>8} {'HWM':>8}"
          f"   | Istio* build / RSS")
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = measure(n, args.pushes, credentials, cert_pem(ca.cert))
        results.append(r)
        push = r["push_s"]
        istio = ISTIO_BUILD.get(n)
        print(f"{n:>9} {r['table_bytes'] / 1e6:>7.2f}MB {r['first_table_s'] * 1e3:>10.0f}ms "
              f"{r['push_median_s'] * 1e3:>11.0f}ms {min(push) * 1e3:>7.0f}-{max(push) * 1e3:<6.0f}ms "
              f"{r['rss_mib']:>6.1f}MB {r['hwm_mib']:>6.1f}MB   | "
              + (f"{istio[0] * 1e3:.0f} ms / {istio[1]:.0f} MiB" if istio else "-"))
    print("  * Istio's agent measured earlier on this machine (its lookup-table build, not a push): not this run.")
    ten = next((r for r in results if r["services"] == 10000), None)
    if ten:
        ok_time = ten["push_median_s"] <= TARGET_10K_S
        ok_rss = ten["rss_mib"] <= TARGET_RSS_MIB
        print(f"targets: 10,000 services push->answer <= {TARGET_10K_S * 1e3:.0f} ms: "
              f"{'MET' if ok_time else 'MISSED'} ({ten['push_median_s'] * 1e3:.0f} ms); "
              f"agent RSS <= {TARGET_RSS_MIB} MB at 10,000: {'MET' if ok_rss else 'MISSED'} ({ten['rss_mib']:.1f} MB)")
    write_report(args.json, {"results": results, "median_push_s": med(r["push_median_s"] for r in results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
