"""Two injected pods on one machine (tests/e2e/meshlab.py): a request from productpage's app to
the reviews ClusterIP is captured, carried over mTLS between the two Envoys, and answered; the
reviews app sees productpage's SPIFFE ID; in STRICT a plain-text connection to the pod port is
refused; the proxy's own traffic is not captured; DNS from inside the pod."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import netns as N
import pytest
from meshlab import EXTERNAL, EXTERNAL_IP, REVIEWS_VIP, TCP_VIP, as_app, running_mesh
from netns import APP_UID, PEER_V4, PROXY_UID
from pod_harness import Pod, ns_http
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)



@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Pod, Pod]]:
    with running_mesh() as lab:
        yield lab.productpage, lab.reviews


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
    done = as_app(productpage, "getent", "hosts", name)
    assert done.returncode == 0 and done.stdout.split()[0] == address, (done.stdout, done.stderr)
    query = ("+search", name) if "." not in name else ("+nosearch", f"{name}.")
    done = as_app(productpage, "dig", "+short", "+time=5", "+tries=1", *query)
    assert done.stdout.strip().splitlines()[-1:] == [address], (name, done.stdout, done.stderr)


@pytest.mark.timeout(120)
def test_the_dns_proxy_counts_what_it_answered(mesh: tuple[Pod, Pod]) -> None:
    productpage, _ = mesh
    assert as_app(productpage, "getent", "hosts", "reviews").returncode == 0
    status, body, _ = ns_http(productpage.ns, "127.0.0.1", 15020, "/stats/prometheus")
    assert status == 200
    requests = [line for line in body.decode().splitlines() if line.startswith("istio_agent_dns_requests_total")]
    assert requests and float(requests[0].split()[-1]) > 0, body.decode()[:2000]
