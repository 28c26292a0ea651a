"""The two-pod mesh over time (tests/e2e/meshlab.py): the control plane away and back, workload
certificates of 30 s rotating under a request loop, an agent stopped mid-request, and nothing left
behind."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from meshlab import MESH, NAMESPACE, REVIEWS_VIP, Mesh, as_app, running_mesh, wait
from netns import PEER_V4
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)


DETAILS_VIP = "10.96.0.23"
DETAILS = f"""\
  - name: details
    namespace: {NAMESPACE}
    clusterIP: {DETAILS_VIP}
    ports: [{{port: 9080, name: http}}]
    endpoints: [{{addresses: [{PEER_V4}], serviceAccount: reviews}}]
"""



def _get(lab: Mesh, url: str) -> bool:
    done = as_app(lab.productpage, "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", url)
    return done.stdout == "200"


def _loop(lab: Mesh, seconds: float) -> tuple[int, list[str]]:
    """Requests (a new connection each, and a name looked up each) for `seconds`: (sent, failures)."""
    failures: list[str] = []
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent += 1
        if not _get(lab, f"http://{REVIEWS_VIP}:9080/"):
            failures.append(f"request {sent} at {time.monotonic() - deadline + seconds:.1f}s")
        if as_app(lab.productpage, "getent", "hosts", "reviews").returncode != 0:
            failures.append(f"lookup {sent}")
    return sent, failures


@pytest.mark.timeout(240)
def test_control_plane_away_then_back_with_a_new_service() -> None:
    with running_mesh() as lab:
        lab.controlplane.terminate()
        assert lab.controlplane.wait(timeout=30) == 0
        sent, failures = _loop(lab, 30)  # the last tables, clusters and certificates keep serving
        assert sent > 10 and not failures, failures
        lab.reviews.start_controlplane(MESH.replace("  - name: productpage", DETAILS + "  - name: productpage"),
                                       others=(lab.productpage,))
        wait(lambda: as_app(lab.productpage, "getent", "hosts", "details").stdout.startswith(DETAILS_VIP),
             "the new service resolvable", (lab.productpage,), timeout=90)
        wait(lambda: _get(lab, f"http://{DETAILS_VIP}:9080/"), "the new service reachable", (lab.productpage,),
             timeout=60)


@pytest.fixture(scope="module")
def short_certs() -> Iterator[Mesh]:
    with running_mesh(controlplane_args=("--max-cert-ttl", "30s")) as lab:
        yield lab


@pytest.mark.timeout(240)
def test_certificates_of_30s_rotate_under_load_without_a_failure(short_certs: Mesh) -> None:
    lab = short_certs
    sent, failures = _loop(lab, 45)
    assert sent > 10 and not failures, failures
    for pod in (lab.productpage, lab.reviews):
        assert pod.log().count("identity: certificate for") >= 2, pod.log()[-3000:]  # rotated at least once


@pytest.mark.timeout(240)
def test_sigterm_lets_the_request_in_flight_complete(short_certs: Mesh) -> None:
    lab = short_certs
    result: list[subprocess.CompletedProcess[str]] = []
    slow = threading.Thread(target=lambda: result.append(as_app(
        lab.productpage, "curl", "-sS", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}",
        f"http://{REVIEWS_VIP}:9080/slow?2")))
    slow.start()
    wait(lambda: "slow request" in lab.reviews.log("app.log"), "the slow request at the app", (lab.productpage,))
    agent = lab.agents["productpage"]
    agent.send_signal(signal.SIGTERM)
    slow.join(timeout=60)
    assert result and result[0].stdout == "200", result
    assert agent.wait(timeout=60) == 0, lab.productpage.log()[-3000:]


def test_nothing_is_left_behind() -> None:
    with running_mesh() as lab:
        names = (lab.topo.pod, lab.topo.peer)
        work = str(lab.work)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(name in listed for name in names), listed
    leftover = subprocess.run(["pgrep", "-af", work], capture_output=True, text=True, check=False).stdout
    assert leftover == "", leftover
