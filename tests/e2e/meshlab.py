"""The two-pod mesh of the end-to-end tests, on one machine (tests/pod_harness.py says what stands
for what): productpage in the `pod` namespace (DNS capture on, its resolv.conf naming the cluster's
DNS), reviews in the `peer` one beside `pilotfish controlplane` and an upstream DNS server
(dnsmasq) that knows one external name; each pod with `pilot-agent istio-iptables` and `pilot-agent
proxy` (Envoy through the agent); STRICT mTLS mesh-wide."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import netns as N
from netns import APP_UID, PEER_V4, POD_V4
from pod_harness import NAMESPACE, Pod, ns_http

REVIEWS_VIP, PRODUCTPAGE_VIP, TCP_VIP = "10.96.0.21", "10.96.0.20", "10.96.0.22"
EXTERNAL, EXTERNAL_IP = "external.example", "203.0.113.9"  # known only to the upstream (dnsmasq in the peer)
# productpage's resolv.conf, as kubelet writes a pod's (the cluster's DNS: the upstream dnsmasq)
RESOLV = f"nameserver {PEER_V4}\nsearch {NAMESPACE}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
MESH = f"""\
services:
  - name: reviews
    namespace: {NAMESPACE}
    clusterIP: {REVIEWS_VIP}
    ports: [{{port: 9080, name: http}}]
    endpoints: [{{addresses: [{PEER_V4}], serviceAccount: reviews}}]
  - name: ratings-tcp
    namespace: {NAMESPACE}
    clusterIP: {TCP_VIP}
    ports: [{{port: 7070, name: tcp-echo, targetPort: 9081}}]
    endpoints: [{{addresses: [{PEER_V4}], serviceAccount: reviews}}]
  - name: productpage
    namespace: {NAMESPACE}
    clusterIP: {PRODUCTPAGE_VIP}
    ports: [{{port: 9080, name: http}}]
    endpoints: [{{addresses: [{POD_V4}], serviceAccount: productpage}}]
serviceEntries:
  - {{name: partner, namespace: {NAMESPACE}, hosts: [api.partner.example], addresses: [240.240.0.9], ports: [443]}}
peerAuthentications:
  - {{name: default, namespace: istio-system, mtls: {{mode: STRICT}}}}
"""


def probe(health_port: int) -> str:
    """A WorkloadGroup probe (and a VM's ProxyConfig.readinessProbe) checking `health_port` each second."""
    return f"{{periodSeconds: 1, timeoutSeconds: 1, httpGet: {{path: /, port: {health_port}}}}}"


def with_vm_group(mesh: str, group: str, service_account: str, vip: str, health_port: int) -> str:
    """`mesh` and a WorkloadGroup `group` (label `workload: <group>`, the probe on `health_port`)
    with two Services selecting it: `<group>` on `vip` and `<group>-headless`, port 9080."""
    services = "".join(f"""\
  - name: {name}
    namespace: {NAMESPACE}
    clusterIP: {ip}
    ports: [{{port: 9080, name: http}}]
    selector: {{workload: {group}}}
""" for name, ip in ((group, vip), (f"{group}-headless", "None")))
    return mesh.replace("serviceEntries:", services + "serviceEntries:") + f"""\
workloadGroups:
  - name: {group}
    namespace: {NAMESPACE}
    labels: {{workload: {group}}}
    serviceAccount: {service_account}
    probe: {probe(health_port)}
"""


def health_server(pod: Pod, ns: str, port: int) -> subprocess.Popen[bytes]:
    """A VM's health endpoint (its probe's target) in `ns`, as the app's user."""
    return pod.spawn(ns, [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0", "--directory", "/"],
                     pod.work / "health.log", uid=APP_UID)


def in_eds(from_ns: str, cluster: str, ip: str) -> bool:
    """Whether the Envoy in `from_ns` has `ip`:9080 as an endpoint of `cluster`."""
    try:
        body = ns_http(from_ns, "127.0.0.1", 15000, "/clusters")[1].decode()
    except OSError:
        return False
    return f"{cluster}::{ip}:9080::" in body


# the reviews app: HTTP on 9080 answering with the x-forwarded-client-cert it was given, and a
# TCP echo on 9081
APP = """\
import http.server, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as an application server would
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    def do_GET(self):
        if self.path.startswith("/slow"):  # a request still in flight when its caller's proxy stops
            import time
            print("slow request", flush=True)
            time.sleep(float(self.path.split("?", 1)[1]))
        body = ("caller=" + self.headers.get("x-forwarded-client-cert", "none")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"echo " + self.rfile.readline())
socketserver.ThreadingTCPServer.allow_reuse_address = True
threading.Thread(target=socketserver.ThreadingTCPServer(("0.0.0.0", 9081), Echo).serve_forever, daemon=True).start()
print("ready", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 9080), H).serve_forever()
"""


def wait(condition: object, what: str, pods: tuple[Pod, ...], timeout: float = 60.0) -> None:
    """Poll `condition` until true, or fail with the pods' agent logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}:\n{p.log()[-3000:]}" for p in pods)
    raise AssertionError(f"no {what} within {timeout}s\n{logs}")


def ready(from_ns: str, ip: str) -> bool:
    try:
        return ns_http(from_ns, ip, 15020, "/healthz/ready")[0] == 200
    except OSError:
        return False


@dataclass
class Mesh:
    topo: N.Topology
    work: Path
    productpage: Pod
    reviews: Pod
    controlplane: subprocess.Popen[bytes]
    agents: dict[str, subprocess.Popen[bytes]]


@contextmanager
def running_mesh(mesh: str = MESH, controlplane_args: tuple[str, ...] = (), reviews_env: dict[str, str] | None = None,
                 reviews_mesh_config: str = "", productpage_sidecar: bool = True) -> Iterator[Mesh]:
    """The two pods, ready; everything stopped and removed on exit. `reviews_env` is more of the
    reviews agent's environment, `reviews_mesh_config` its ./etc/istio/config/mesh (a VM's
    mesh.yaml, as `istioctl x workload entry configure` writes it). Without
    `productpage_sidecar`, productpage's namespace is left bare (no capture, no agent) for a test
    to run its own there (a VM: tests/e2e/test_vm.py)."""
    with N.topology() as topo:
        work = Path(tempfile.mkdtemp(prefix="pilotfish-mesh-"))
        work.chmod(0o755)
        productpage = Pod(topo, work / "productpage", name="productpage-1", service_account="productpage",
                          token="productpage-token", resolv=RESOLV)
        reviews = Pod(topo, work / "reviews", ns=topo.peer, ip=PEER_V4, name="reviews-1", service_account="reviews",
                      token="reviews-token", istiod="127.0.0.1")
        try:
            controlplane = reviews.start_controlplane(mesh, others=(productpage,), extra_args=controlplane_args)
            root = reviews.root / "var/run/secrets/istio/root-cert.pem"
            wait(lambda: root.exists() and root.stat().st_size > 0, "root certificate", (reviews,))
            (productpage.root / "var/run/secrets/istio/root-cert.pem").write_bytes(root.read_bytes())
            (work / "upstream.hosts").write_text(f"{EXTERNAL_IP} {EXTERNAL}\n")
            (work / "upstream.hosts").chmod(0o644)
            reviews.spawn(topo.peer, ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                      f"--addn-hosts={work / 'upstream.hosts'}", f"--listen-address={PEER_V4}",
                                      "--bind-interfaces", "--log-facility=-", "--pid-file=", "--conf-file=/dev/null"],
                          work / "dnsmasq.log")
            sidecars = ((productpage, "", True),) if productpage_sidecar else ()
            for pod, extra, dns in (*sidecars, (reviews, "15012", False)):
                done = pod.init(exclude_inbound=extra, dns_capture=dns)
                assert done.returncode == 0, done.stderr
            app = reviews.spawn(topo.peer, [sys.executable, "-c", APP], reviews.work / "app.log", uid=APP_UID)
            wait(lambda: "ready" in reviews.log("app.log") or app.poll() is not None, "the app", (reviews,))
            if reviews_mesh_config:
                config = reviews.root / "etc/istio/config/mesh"
                config.parent.mkdir(parents=True, exist_ok=True)
                for directory in (config.parent, config.parent.parent):
                    directory.chmod(0o755)
                config.write_text(reviews_mesh_config)
                config.chmod(0o644)
            agents = {"reviews": reviews.proxy(reviews_env)}
            if productpage_sidecar:
                agents["productpage"] = productpage.proxy({"ISTIO_META_DNS_CAPTURE": "true"})
            wait(lambda: ready(topo.pod, PEER_V4) and (not productpage_sidecar or ready(topo.peer, POD_V4)),
                 "the proxies ready", (reviews, productpage))
            assert all(agent.poll() is None for agent in agents.values())
            yield Mesh(topo, work, productpage, reviews, controlplane, agents)
        finally:
            for pod in (productpage, reviews):
                pod.stop()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def as_app(pod: Pod, *argv: str, uid: int = APP_UID) -> subprocess.CompletedProcess[str]:
    """A command in the pod as its application's user (its traffic is captured)."""
    return subprocess.run(N.ns_argv(pod.ns, list(argv), uid, uid), capture_output=True, text=True, timeout=30,
                          check=False)
