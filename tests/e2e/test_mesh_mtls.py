"""Two injected pods on one machine (tests/pod_harness.py): productpage in the `pod` namespace,
reviews in the `peer` one, each with `pilot-agent istio-iptables` and `pilot-agent proxy` (Envoy
through the agent), `pilotfish controlplane` beside reviews. A request from productpage's app to
the reviews ClusterIP is captured, carried over mTLS between the two Envoys, and answered; the
reviews app sees productpage's SPIFFE ID; in STRICT a plain-text connection to the pod port is
refused; the proxy's own traffic is not captured."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import netns as N
import pytest
from netns import APP_UID, PEER_V4, POD_V4, PROXY_UID
from pod_harness import NAMESPACE, Pod, ns_http
from pod_harness import skip_reason as pod_skip_reason

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
# the reviews app: HTTP on 9080 answering with the x-forwarded-client-cert it was given, and a
# TCP echo on 9081
APP = """\
import http.server, socketserver, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
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


@pytest.fixture(scope="module", autouse=True)
def _environment() -> None:
    reason = pod_skip_reason()
    if reason:
        pytest.skip(reason)
    N.reap_stale_namespaces()


def _wait(condition: object, what: str, pods: tuple[Pod, ...], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    logs = "\n".join(f"--- {p.name}:\n{p.log()[-3000:]}" for p in pods)
    raise AssertionError(f"no {what} within {timeout}s\n{logs}")


def _ready(from_ns: str, ip: str) -> bool:
    try:
        return ns_http(from_ns, ip, 15020, "/healthz/ready")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Pod, Pod]]:
    with N.topology() as topo:
        work = Path(tempfile.mkdtemp(prefix="pilotfish-mesh-"))
        work.chmod(0o755)
        productpage = Pod(topo, work / "productpage", name="productpage-1", service_account="productpage",
                          token="productpage-token", resolv=RESOLV)
        reviews = Pod(topo, work / "reviews", ns=topo.peer, ip=PEER_V4, name="reviews-1", service_account="reviews",
                      token="reviews-token", istiod="127.0.0.1")
        try:
            reviews.start_controlplane(MESH, others=(productpage,))
            root = reviews.root / "var/run/secrets/istio/root-cert.pem"
            _wait(lambda: root.exists() and root.stat().st_size > 0, "root certificate", (reviews,))
            (productpage.root / "var/run/secrets/istio/root-cert.pem").write_bytes(root.read_bytes())
            (work / "upstream.hosts").write_text(f"{EXTERNAL_IP} {EXTERNAL}\n")
            (work / "upstream.hosts").chmod(0o644)
            reviews.spawn(topo.peer, ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                      f"--addn-hosts={work / 'upstream.hosts'}", f"--listen-address={PEER_V4}",
                                      "--bind-interfaces", "--log-facility=-", "--pid-file=", "--conf-file=/dev/null"],
                          work / "dnsmasq.log")
            for pod, extra, dns in ((productpage, "", True), (reviews, "15012", False)):
                done = pod.init(exclude_inbound=extra, dns_capture=dns)
                assert done.returncode == 0, done.stderr
            app = reviews.spawn(topo.peer, [sys.executable, "-c", APP], reviews.work / "app.log", uid=APP_UID)
            _wait(lambda: "ready" in reviews.log("app.log") or app.poll() is not None, "the app", (reviews,))
            agents = [reviews.proxy(), productpage.proxy({"ISTIO_META_DNS_CAPTURE": "true"})]
            _wait(lambda: _ready(topo.pod, PEER_V4) and _ready(topo.peer, POD_V4), "both proxies ready",
                  (reviews, productpage))
            assert all(agent.poll() is None for agent in agents)
            yield productpage, reviews
        finally:
            for pod in (productpage, reviews):
                pod.stop()
            subprocess.run(["rm", "-rf", str(work)], check=False)


def _curl(pod: Pod, url: str, uid: int = APP_UID) -> subprocess.CompletedProcess[str]:
    return subprocess.run(N.ns_argv(pod.ns, ["curl", "-sS", "-m", "10", url], uid, uid), capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.timeout(240)
def test_http_to_a_cluster_ip_goes_over_mtls_with_the_callers_identity(mesh: tuple[Pod, Pod]) -> None:
    productpage, reviews = mesh
    done = _curl(productpage, f"http://{REVIEWS_VIP}:9080/")
    assert done.returncode == 0, done.stderr + productpage.log()[-2000:]
    assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in done.stdout, done.stdout


@pytest.mark.timeout(120)
def test_tcp_to_a_cluster_ip_goes_to_the_target_port(mesh: tuple[Pod, Pod]) -> None:
    productpage, _ = mesh
    script = (f"import socket; s = socket.create_connection(('{TCP_VIP}', 7070), timeout=10); "
              "s.sendall(b'hi\\n'); print(s.recv(100).decode().strip())")
    done = subprocess.run(N.ns_argv(productpage.ns, [sys.executable, "-c", script], APP_UID, APP_UID),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.stdout.strip() == "echo hi", done.stderr


@pytest.mark.timeout(120)
def test_strict_refuses_plain_text_to_the_pod_port(mesh: tuple[Pod, Pod]) -> None:
    """uid 1337's traffic is not captured on the way out (so it is plain text), and reviews'
    inbound capture sends it to a STRICT chain that wants TLS: closed."""
    productpage, _ = mesh
    done = _curl(productpage, f"http://{PEER_V4}:9080/", uid=PROXY_UID)
    assert done.returncode != 0 and "caller=" not in done.stdout, done.stdout


def _as_app(pod: Pod, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(N.ns_argv(pod.ns, list(argv), APP_UID, APP_UID), capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "address"), [
    ("reviews", REVIEWS_VIP), ("reviews.default", REVIEWS_VIP), ("reviews.default.svc.cluster.local", REVIEWS_VIP),
    ("api.partner.example", "240.240.0.9"), (EXTERNAL, EXTERNAL_IP),
])
def test_dns_from_the_pod_with_glibc_and_dig(mesh: tuple[Pod, Pod], name: str, address: str) -> None:
    """glibc's resolver (search list, ndots:5) and dig (the short name with `+search`, the others
    as absolute names), both captured to the agent's DNS proxy; the external name is forwarded to
    the upstream."""
    productpage, _ = mesh
    done = _as_app(productpage, "getent", "hosts", name)
    assert done.returncode == 0 and done.stdout.split()[0] == address, (done.stdout, done.stderr)
    query = ("+search", name) if "." not in name else ("+nosearch", f"{name}.")
    done = _as_app(productpage, "dig", "+short", "+time=5", "+tries=1", *query)
    assert done.stdout.strip().splitlines()[-1:] == [address], (name, done.stdout, done.stderr)


@pytest.mark.timeout(120)
def test_the_dns_proxy_counts_what_it_answered(mesh: tuple[Pod, Pod]) -> None:
    productpage, _ = mesh
    assert _as_app(productpage, "getent", "hosts", "reviews").returncode == 0
    status, body, _ = ns_http(productpage.ns, "127.0.0.1", 15020, "/stats/prometheus")
    assert status == 200
    requests = [line for line in body.decode().splitlines() if line.startswith("istio_agent_dns_requests_total")]
    assert requests and float(requests[0].split()[-1]) > 0, body.decode()[:2000]
