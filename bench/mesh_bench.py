#!/usr/bin/env python3
"""Mesh benchmark: what the mesh costs a request, and how soon a pod's first meshed request works.

Two pods on one machine (tests/e2e/meshlab.py): productpage's application calls reviews' HTTP
application by its cluster IP, captured, through both Envoys over mTLS (STRICT), each Envoy with
its agent. The peer, measured in the same run: the same client and server in the same two network
namespaces with no capture, no agent and no Envoy (the call goes to the reviews pod's address).

- Latency per request, p50 and p99 over REQUESTS requests, one client at a time: with HTTP
  keep-alive (one connection) and with a new connection per request. The client is Python's
  http.client, run in the pod as the application's user; the clock is its own.
- Start to first meshed request: productpage's agent started again (the control plane, the
  other pod and capture already there), to the first request from its application that succeeds
  through the mesh, tried every 10 ms.

Root only. Run as `make bench` (`.venv/bin/python bench/mesh_bench.py`); `--quick` for a short run.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchlib import git_commit, write_report

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "init"), str(TESTS / "e2e")]
import netns as N  # noqa: E402
from meshlab import APP, REVIEWS_VIP, running_mesh  # noqa: E402
from netns import APP_UID, PEER_V4  # noqa: E402

CLIENT = """\
import http.client, json, sys, time
host, count, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "keep"
times = []
conn = http.client.HTTPConnection(host, 9080, timeout=10)
for _ in range(count):
    if not keep:
        conn = http.client.HTTPConnection(host, 9080, timeout=10)
    start = time.perf_counter()
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    times.append(time.perf_counter() - start)
    if response.status != 200:
        sys.exit(f"HTTP {response.status}")
    if not keep:
        conn.close()
times.sort()
print(json.dumps({"p50": times[len(times) // 2] * 1000, "p99": times[int(len(times) * 0.99)] * 1000}))
"""


def client(ns: str, host: str, count: int, keep: bool) -> dict[str, float]:
    done = subprocess.run(N.ns_argv(ns, [sys.executable, "-c", CLIENT, host, str(count), "keep" if keep else "new"],
                                    APP_UID, APP_UID), capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"client failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def baseline(count: int) -> dict[str, dict[str, float]]:
    """The same calls in the same two namespaces, with nothing of the mesh."""
    with N.topology() as topo:
        server = subprocess.Popen(N.ns_argv(topo.peer, [sys.executable, "-c", APP], APP_UID, APP_UID),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            return {mode: client(topo.pod, PEER_V4, count, mode == "keep-alive") for mode in ("keep-alive", "new")}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def first_request(lab: object, tries: float = 60.0) -> float:
    """Seconds from productpage's agent start to its app's first request through the mesh."""
    productpage = lab.productpage  # type: ignore[attr-defined]
    agent = lab.agents["productpage"]  # type: ignore[attr-defined]
    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=60)
    probe = N.ns_argv(productpage.ns, ["curl", "-s", "-o", "/dev/null", "-m", "2", "-w", "%{http_code}",
                                       f"http://{REVIEWS_VIP}:9080/"], APP_UID, APP_UID)
    started = time.monotonic()
    lab.agents["productpage"] = productpage.proxy({"ISTIO_META_DNS_CAPTURE": "true"})  # type: ignore[attr-defined]
    while time.monotonic() - started < tries:
        if subprocess.run(probe, capture_output=True, text=True, timeout=10).stdout == "200":
            return time.monotonic() - started
        time.sleep(0.01)
    raise SystemExit("no meshed request succeeded")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per mode and setting")
    parser.add_argument("--starts", type=int, default=5, help="agent starts for the first-request figure")
    parser.add_argument("--quick", action="store_true", help="1,000 requests, 2 starts")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures here")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.starts = 1000, 2
    reason = N.skip_reason() or N.init_missing_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 1
    print(f"pilotfish mesh benchmark  commit {git_commit()}  {args.requests} requests per mode")
    plain = baseline(args.requests)
    with running_mesh() as lab:
        meshed = {mode: client(lab.productpage.ns, REVIEWS_VIP, args.requests, mode == "keep-alive")
                  for mode in ("keep-alive", "new")}
        firsts = [first_request(lab) for _ in range(args.starts)]
    for mode in ("keep-alive", "new"):
        p, m = plain[mode], meshed[mode]
        print(f"  {mode:10s}  no mesh p50 {p['p50']:.3f} ms p99 {p['p99']:.3f} ms | mesh p50 {m['p50']:.3f} ms "
              f"p99 {m['p99']:.3f} ms | added p50 {m['p50'] - p['p50']:+.3f} ms p99 {m['p99'] - p['p99']:+.3f} ms")
    firsts.sort()
    print(f"  agent start to first meshed request: median {firsts[len(firsts) // 2] * 1000:.0f} ms "
          f"(min {firsts[0] * 1000:.0f}, max {firsts[-1] * 1000:.0f}) over {len(firsts)} starts")
    write_report(args.json, {"no_mesh": plain, "mesh": meshed, "first_request_s": firsts, "commit": git_commit()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
