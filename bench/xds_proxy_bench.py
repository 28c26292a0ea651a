#!/usr/bin/env python3
"""xDS proxy benchmark: the latency the agent's xDS proxy (xds_client/proxy.py) adds to each
response on its way from the control plane to Envoy, with 1,000 and 10,000 clusters.

Three processes, so that no GIL is shared between what is measured and what measures:
- a control plane (this file with `--serve`): a gRPC ADS server on 127.0.0.1 (port 0, read back)
  with N EDS clusters shaped as istiod sends them (name, EDS config over ADS, connect timeout,
  circuit breakers, an mTLS transport socket with SDS secrets); it answers a subscription with
  all N, and every ACK with the next push: for SotW all N again (one changed), for Delta the one
  changed cluster. Each response carries its send time (CLOCK_MONOTONIC, shared by the
  processes of one machine) in `system_version_info` / `version_info`;
- the xDS proxy (this file with `--proxy`): XdsProxy on a unix socket, upstream to the control
  plane over plaintext, as the agent runs it beside Envoy; it notes when it holds each response
  (received and parsed, not yet serialized for Envoy), the "at proxy" column: the upstream leg,
  so that the proxied figure splits into the leg up to the proxy and the hop from it to Envoy;
- the client (this process), playing Envoy: subscribes to CDS, ACKs every response, and records
  receive time minus send time per response.

The peer is the same client straight on the control plane (no proxy), measured in the same run,
rounds interleaved direct, proxy, direct, proxy. Beside the latencies: each response's size, the
proxy process's CPU seconds and RSS (now and peak), the machine's load average before and after
(other work on the machine shows there), and what parsing and serializing one full response costs
in this process (the protobuf work a second hop repeats; the rest of a hop is gRPC's). Istio
publishes no figure for its xDS proxy's added latency (docs/istio-compat.md has none;
BENCHMARKS.md says so).

Run as `make bench` (`.venv/bin/python bench/xds_proxy_bench.py`, about 20 s on 2 cores);
`--quick` for a short run (100 and 1,000 clusters, about 2 s); `--json PATH` for the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401  registers UpstreamTlsContext for ParseDict
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any

from benchlib import git_commit, write_report

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
MAX_MESSAGE = 256 << 20


def cluster(i: int, generation: int) -> Any:
    """An outbound EDS cluster as istiod writes one (mTLS to the service, SDS secrets)."""
    name = f"outbound|9080||svc-{i}.ns-{i % 100}.svc.cluster.local"
    c = json_format.ParseDict({
        "name": name, "type": "EDS", "connect_timeout": f"{10 + generation % 5}s",
        "eds_cluster_config": {"service_name": name, "eds_config": {"ads": {}, "initial_fetch_timeout": "0s",
                                                                    "resource_api_version": "V3"}},
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                             "max_requests": 4294967295, "max_retries": 4294967295}]},
        "common_lb_config": {"locality_weighted_lb_config": {}},
        "metadata": {"filter_metadata": {"istio": {"services": [{"host": f"svc-{i}.ns-{i % 100}.svc.cluster.local",
                                                                  "name": f"svc-{i}", "namespace": f"ns-{i % 100}"}]}}},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": f"outbound_.9080_._.svc-{i}.ns-{i % 100}.svc.cluster.local",
            "common_tls_context": {
                "alpn_protocols": ["istio-peer-exchange", "istio"],
                "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {
                    "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [
                        {"envoy_grpc": {"cluster_name": "sds-grpc"}}]}, "resource_api_version": "V3"}}],
                "combined_validation_context": {
                    "default_validation_context": {"match_subject_alt_names": [
                        {"exact": f"spiffe://cluster.local/ns/ns-{i % 100}/sa/svc-{i}"}]},
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {
                        "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [
                            {"envoy_grpc": {"cluster_name": "sds-grpc"}}]}, "resource_api_version": "V3"}}}}}},
    }, Cluster())
    packed = Any()
    packed.Pack(c)
    return packed


# ---------------------------------------------------------------------------------------------
# the control plane (--serve)


class ControlPlane(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, n: int) -> None:
        self.n = n
        self.clusters = [cluster(i, 0) for i in range(n)]

    def _changed(self, generation: int) -> tuple[int, Any]:
        i = generation % self.n
        self.clusters[i] = cluster(i, generation)
        return i, self.clusters[i]

    def StreamAggregatedResources(self, requests: Iterator[DiscoveryRequest],  # noqa: N802  gRPC's name
                                  context: grpc.ServicerContext) -> Iterator[DiscoveryResponse]:
        generation = 0
        for request in requests:
            if request.type_url != CDS:
                continue
            if request.response_nonce and request.response_nonce != str(generation):
                continue
            generation += 1
            if generation > 1:
                self._changed(generation)
            response = DiscoveryResponse(type_url=CDS, resources=self.clusters, nonce=str(generation))
            response.version_info = str(time.monotonic_ns())
            yield response

    def DeltaAggregatedResources(self, requests: Iterator[DeltaDiscoveryRequest],  # noqa: N802
                                 context: grpc.ServicerContext) -> Iterator[DeltaDiscoveryResponse]:
        generation = 0
        for request in requests:
            if request.type_url != CDS:
                continue
            if request.response_nonce and request.response_nonce != str(generation):
                continue
            generation += 1
            if generation == 1:
                resources = [Resource(name=f"c{i}", version="0", resource=c) for i, c in enumerate(self.clusters)]
            else:
                i, c = self._changed(generation)
                resources = [Resource(name=f"c{i}", version=str(generation), resource=c)]
            response = DeltaDiscoveryResponse(type_url=CDS, resources=resources, nonce=str(generation))
            response.system_version_info = str(time.monotonic_ns())
            yield response


def serve(n: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait (grpc's threads inherit the mask)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ControlPlane(n), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    signal.sigwait({signal.SIGTERM})
    server.stop(0)


# ---------------------------------------------------------------------------------------------
# the proxy (--proxy)


def run_proxy(upstream: str, socket_path: str) -> None:
    """The proxy as the agent runs it, but that it notes, for each response it passes on, when it
    had it (received and parsed, before it is serialized for Envoy) less the control plane's send
    time: the upstream leg of the proxied figure. Printed as JSON on SIGTERM."""
    from pilotfish.xds_client.channel import XdsChannel, XdsSettings
    from pilotfish.xds_client.proxy import XdsProxy, _Pair
    from pilotfish.xds_client.resources import ResourceCache

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait (grpc's threads inherit the mask)
    legs: dict[str, list[float]] = {}

    class TimedProxy(XdsProxy):
        def _stream(self, pair: _Pair, requests: Iterator[Any]) -> Iterator[object]:
            first = True
            for response in super()._stream(pair, requests):
                sent = int(response.system_version_info if pair.delta else response.version_info)  # type: ignore[attr-defined]
                key = f"{'delta' if pair.delta else 'sotw'} {'first' if first else 'push'}"
                legs.setdefault(key, []).append((time.monotonic_ns() - sent) / 1e6)
                first = False
                yield response

    proxy = TimedProxy(XdsChannel(XdsSettings(upstream, "istiod", None, "/nonexistent")), ResourceCache(), [],
                       socket_path)
    proxy.start()
    print("serving", flush=True)
    signal.sigwait({signal.SIGTERM})
    proxy.stop(0)
    print(json.dumps(legs), flush=True)


# ---------------------------------------------------------------------------------------------
# the client


def measure(target: str, delta: bool, responses: int) -> tuple[list[float], list[int]]:
    """Milliseconds from the control plane's send to this client's receive, per response (the
    first, with every cluster, first), and each response's size in bytes."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    out: queue.SimpleQueue[object] = queue.SimpleQueue()
    out.put(DeltaDiscoveryRequest(type_url=CDS) if delta else DiscoveryRequest(type_url=CDS))

    def requests() -> Iterator[object]:
        while (item := out.get()) is not None:
            yield item

    call = (stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources)(requests())
    latencies: list[float] = []
    sizes: list[int] = []
    try:
        for response in call:
            received = time.monotonic_ns()
            sent = int(response.system_version_info if delta else response.version_info)
            latencies.append((received - sent) / 1e6)
            sizes.append(response.ByteSize())
            if len(latencies) >= responses:
                break
            if delta:
                out.put(DeltaDiscoveryRequest(type_url=CDS, response_nonce=response.nonce))
            else:
                out.put(DiscoveryRequest(type_url=CDS, version_info=response.version_info,
                                         response_nonce=response.nonce))
    finally:
        out.put(None)
        call.cancel()
        channel.close()
    return latencies, sizes


def protobuf_ms(n: int) -> tuple[float, float]:
    """Milliseconds to parse, and to serialize, one SotW response with all n clusters in this
    process (median of 5): the protobuf half of what a relay that parses does again."""
    wire = DiscoveryResponse(type_url=CDS, resources=ControlPlane(n).clusters, nonce="1").SerializeToString()
    parse, serialize = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        message = DiscoveryResponse.FromString(wire)
        t1 = time.perf_counter()
        message.SerializeToString()
        t2 = time.perf_counter()
        parse.append((t1 - t0) * 1e3)
        serialize.append((t2 - t1) * 1e3)
    return statistics.median(parse), statistics.median(serialize)


def spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (VmRSS) or at its peak (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_size(n: int, rounds: int, pushes: int) -> list[dict[str, object]]:
    """Both protocols with n clusters, a control plane and a proxy of their own; prints the rows."""
    cp, line = spawn("--serve", str(n))
    address = f"127.0.0.1:{line.split()[1]}"
    work = tempfile.mkdtemp(prefix="pilotfish-xdsbench-")
    socket_path = os.path.join(work, "XDS")
    proxy, _ = spawn("--proxy", address, socket_path)
    got: dict[tuple[str, str, str], list[float]] = {}
    size: dict[tuple[str, str], int] = {}
    try:
        proxy_cpu = cpu_s(proxy.pid)
        for protocol in ("delta", "sotw"):
            for _ in range(rounds):
                for how, target in (("direct", address), ("proxy", f"unix:{socket_path}")):
                    lat, sizes = measure(target, protocol == "delta", 1 + pushes)
                    got.setdefault((protocol, "first", how), []).append(lat[0])
                    got.setdefault((protocol, "push", how), []).extend(lat[1:])
                    size[protocol, "first"], size[protocol, "push"] = sizes[0], max(sizes[1:], default=0)
        proxy_cpu = cpu_s(proxy.pid) - proxy_cpu
        rss, peak = rss_mb(proxy.pid), rss_mb(proxy.pid, "VmHWM")
    finally:
        legs = stop(proxy)
        stop(cp)
        subprocess.run(["rm", "-rf", work], check=False)
    report: list[dict[str, object]] = []
    for (protocol, kind) in size:
        d, p, at = got[protocol, kind, "direct"], got[protocol, kind, "proxy"], legs.get(f"{protocol} {kind}", [])
        dm, pm = statistics.median(d), statistics.median(p)
        print(f"{n:>8} {protocol:>8} {kind:>8} {size[protocol, kind]:>9} | "
              f"{dm:7.2f} p90 {pct(d, 0.9):6.2f} | {pm:7.2f} p90 {pct(p, 0.9):6.2f} | "
              f"{pm - dm:9.2f} {pm / dm:6.2f} | {statistics.median(at) if at else float('nan'):8.2f}")
        report.append({"clusters": n, "protocol": protocol, "response": kind, "bytes": size[protocol, kind],
                       "direct_ms": d, "proxy_ms": p, "at_proxy_ms": at})
    parse, serialize = protobuf_ms(n)
    print(f"{n:>8} clusters: proxy process CPU {proxy_cpu:.2f} s over the run, RSS {rss:.1f} MiB "
          f"(peak {peak:.1f}); one full response in this process: parse {parse:.2f} ms, serialize {serialize:.2f} ms")
    report.append({"clusters": n, "proxy_cpu_s": proxy_cpu, "proxy_rss_mib": rss, "proxy_peak_rss_mib": peak,
                   "parse_ms": parse, "serialize_ms": serialize})
    return report


def stop(proc: subprocess.Popen[str]) -> dict[str, list[float]]:
    """SIGTERM, then what the process printed last (the proxy's legs; {} for the control plane)."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    last = out.strip().splitlines()[-1:] if out else []
    return json.loads(last[0]) if last and last[0].startswith("{") else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="cluster counts (default 1000,10000)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved direct/proxy rounds per case")
    parser.add_argument("--pushes", type=int, default=20, help="responses after the first, per round")
    parser.add_argument("--quick", action="store_true", help="100 and 1000 clusters, 1 round, 5 pushes")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures here")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--proxy", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.proxy:
        run_proxy(*args.proxy)
        return 0
    if args.quick:
        args.sizes, args.rounds, args.pushes = "100,1000", 1, 5
    print(f"pilotfish xDS proxy benchmark  commit {git_commit('bench', 'xds_client')}  {os.cpu_count()} cores  "
          f"load average {load_average()}  {args.rounds} rounds x (1 + {args.pushes}) responses")
    print(f"{'clusters':>8} {'protocol':>8} {'response':>8} {'bytes':>9} | {'direct ms':>16} | {'proxy ms':>16} | "
          f"{'added ms':>9} {'ratio':>6} | {'at proxy':>8}")
    report: list[dict[str, object]] = []
    for n in (int(x) for x in args.sizes.split(",")):
        report += run_size(n, args.rounds, args.pushes)
    print(f"load average after: {load_average()}")
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
