"""`--token-review`: a workload's service-account token, vouched for by the Kubernetes API
server's TokenReview, gets a certificate for `spiffe://TD/ns/NS/sa/SA`; an unauthenticated token,
the wrong audience, an API server that is down, hangs, refuses or answers too much gets nothing,
with a log line saying why, and the control plane keeps serving. The API server is a small fake
over HTTPS (a real one cannot run here); the agent side is the agent's own CA client."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from ca_harness import Ca, identity
from clirun import run_cli
from pilotfish.agent.identity.caclient import CaCallError
from pilotfish.agent.identity.keys import KeySpec, csr_pem, new_key, spiffe_id
from pilotfish.controlplane.ca import cert_pem, issue_serving, key_pem, new_root, serving_names
from pilotfish.controlplane.ca import new_key as ca_new_key
from pilotfish.controlplane.casvc import spiffe
from pilotfish.controlplane.tokenreview import (
    CACHE_TTL,
    MAX_IN_FLIGHT,
    MAX_RESPONSE,
    ApiServer,
    ReviewFailed,
    TokenReviewer,
    in_cluster,
    parse_review,
    review_body,
)

POD_TOKEN = "pod-token"  # what the workload's agent sends
OWN_TOKEN = "controlplane-token"  # the control plane's own service-account token
SHOP_CLIENT = spiffe_id("cluster.local", "shop", "client")


def review_answer(authenticated: bool = True, audiences: tuple[str, ...] = ("istio-ca",),
                  username: str = "system:serviceaccount:shop:client", error: str = "") -> dict[str, object]:
    status: dict[str, object] = {"authenticated": authenticated, "audiences": list(audiences),
                                 "user": {"username": username,
                                          "groups": ["system:serviceaccounts", "system:serviceaccounts:shop"]}}
    if error:
        status = {"error": error}
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


class FakeApiServer:
    """POST /apis/authentication.k8s.io/v1/tokenreviews over HTTPS, answering as `mode` says:
    `ok` (the pod's token is shop/client when asked with the control plane's own token and the
    audience istio-ca; anything else is not authenticated), `wrong-audience`, `huge`, `forbidden`
    or `hang` (never answers until stopped)."""

    def __init__(self, tmp: Path) -> None:
        now = datetime.now(UTC)
        root = new_root(ca_new_key(), now - timedelta(days=1))
        key = ca_new_key()
        (tmp / "api-cert.pem").write_bytes(cert_pem(issue_serving(root, key, serving_names(), now)))
        (tmp / "api-key.pem").write_bytes(key_pem(key))
        (tmp / "ca.crt").write_bytes(cert_pem(root.cert))
        (tmp / "token").write_text(OWN_TOKEN + "\n")
        self.mode = "ok"
        self.requests: list[tuple[str, str, dict[str, object]]] = []
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, self.headers["Authorization"], body))
                status, answer = 201, b""
                if fake.mode == "hang":
                    fake.release.wait(30)
                    return
                if fake.mode == "forbidden":
                    status, answer = 403, b'{"kind":"Status","reason":"Forbidden"}'
                elif fake.mode == "huge":
                    answer = b"{" + b" " * (4 * MAX_RESPONSE) + b"}"
                elif fake.mode == "wrong-audience":
                    answer = json.dumps(review_answer(audiences=("https://kubernetes.default.svc",))).encode()
                else:
                    good = (self.headers["Authorization"] == f"Bearer {OWN_TOKEN}"
                            and body["spec"] == {"token": POD_TOKEN, "audiences": ["istio-ca"]})
                    answer = json.dumps(review_answer() if good else review_answer(
                        authenticated=False, error="[invalid bearer token, token lookup failed]")).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp / "api-cert.pem", tmp / "api-key.pem")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.api = ApiServer("127.0.0.1", self.httpd.server_address[1], str(tmp / "ca.crt"), str(tmp / "token"))
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer(tmp_path)
    yield server
    server.stop()


def ca_with_review(tmp_path: Path, api: ApiServer, timeout: float = 5.0) -> Ca:
    reviewer = TokenReviewer(api, timeout=timeout)
    return Ca(tmp_path, timedelta(hours=1), review=lambda token: spiffe("cluster.local", reviewer.review(token)))


def ask(tmp_path: Path, ca: Ca, token: str, identity_asked: str = SHOP_CLIENT) -> list[str]:
    key = new_key(KeySpec(algorithm="ECDSA"))
    client = identity(tmp_path, ca, token=token).client
    return client.sign(csr_pem(key, identity_asked), None, client.token())


def test_a_token_the_api_server_vouches_for_gets_its_service_accounts_certificate(
        tmp_path: Path, api: FakeApiServer) -> None:
    ca = ca_with_review(tmp_path, api.api)
    try:
        chain = ask(tmp_path, ca, POD_TOKEN)
    finally:
        ca.stop()
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["spiffe://cluster.local/ns/shop/sa/client"]
    path, authorization, body = api.requests[0]
    assert path == "/apis/authentication.k8s.io/v1/tokenreviews"
    assert authorization == f"Bearer {OWN_TOKEN}"  # the control plane's own token, read from its file
    assert body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": POD_TOKEN, "audiences": ["istio-ca"]}}
    assert ca.service.issued == 1


@pytest.mark.parametrize(("mode", "token", "logged"), [
    ("ok", "stolen-token", "token not authenticated: [invalid bearer token"),
    ("wrong-audience", POD_TOKEN, "include none of ['istio-ca']"),
    ("huge", POD_TOKEN, f"answered more than {MAX_RESPONSE} bytes"),
    ("forbidden", POD_TOKEN, "system:auth-delegator"),
    ("down", POD_TOKEN, "cannot reach the API server"),
    ("hang", POD_TOKEN, "cannot reach the API server"),
])
def test_a_token_without_a_good_review_is_unauthenticated_and_the_log_says_why(
        tmp_path: Path, api: FakeApiServer, caplog: pytest.LogCaptureFixture,
        mode: str, token: str, logged: str) -> None:
    caplog.set_level(logging.WARNING, logger="pilotfish.controlplane")
    target = api.api
    unlistened = socket.socket()  # bound, never listening: connections are refused (kept for the test)
    if mode == "down":
        unlistened.bind(("127.0.0.1", 0))
        target = ApiServer("127.0.0.1", unlistened.getsockname()[1], api.api.ca_file, api.api.token_file)
    api.mode = mode
    ca = ca_with_review(tmp_path, target, timeout=0.5)
    try:
        with pytest.raises(CaCallError, match="UNAUTHENTICATED"):
            ask(tmp_path, ca, token)
        assert ca.service.refused == 1
        # still serving: the next agent with a listed token is answered
        assert len(ask(tmp_path, ca, "good-token", spiffe_id("cluster.local", "default", "productpage"))) == 2
    finally:
        ca.stop()
        unlistened.close()
    reviews = [r.getMessage() for r in caplog.records if "token review:" in r.getMessage()]
    assert reviews and logged in reviews[0], reviews


def test_a_vouched_for_token_is_remembered_for_a_while_never_past_its_expiry(api: FakeApiServer) -> None:
    now = [1000.0]
    reviewer = TokenReviewer(api.api, clock=lambda: now[0])
    assert reviewer.review(POD_TOKEN) == "shop/client"
    now[0] += CACHE_TTL - 1
    assert reviewer.review(POD_TOKEN) == "shop/client"
    assert len(api.requests) == 1  # an agent reconnecting costs no API call
    now[0] += 1
    reviewer.review(POD_TOKEN)
    assert len(api.requests) == 2
    with pytest.raises(ReviewFailed):  # a refusal is not remembered as a success
        reviewer.review("stolen-token")
    with pytest.raises(ReviewFailed):
        reviewer.review("stolen-token")
    assert len(api.requests) == 4


@pytest.mark.timeout(30)
def test_reviews_waiting_on_the_api_server_are_bounded_and_one_more_is_refused_at_once(api: FakeApiServer) -> None:
    api.mode = "hang"
    reviewer = TokenReviewer(api.api, timeout=20)
    failures: list[str] = []

    def review() -> None:
        try:
            reviewer.review(POD_TOKEN)
        except ReviewFailed as err:
            failures.append(str(err))

    waiting = [threading.Thread(target=review, daemon=True) for _ in range(MAX_IN_FLIGHT)]
    for thread in waiting:
        thread.start()
    wait_until(lambda: len(api.requests) == MAX_IN_FLIGHT)
    with pytest.raises(ReviewFailed, match="busy"):
        reviewer.review(POD_TOKEN)
    assert len(api.requests) == MAX_IN_FLIGHT
    api.release.set()
    for thread in waiting:
        thread.join(10)
    api.mode = "ok"
    assert reviewer.review(POD_TOKEN) == "shop/client"  # the slots are given back


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_review_answer_must_name_a_service_account_for_the_audience() -> None:
    def answer(**kwargs: object) -> bytes:
        return json.dumps(review_answer(**kwargs)).encode()  # type: ignore[arg-type]

    assert parse_review(201, answer(), ["istio-ca"]) == "shop/client"
    assert parse_review(201, answer(audiences=("other", "istio-ca")), ["istio-ca"]) == "shop/client"
    for status, body, words in [
        (201, answer(authenticated=False), "not authenticated"),
        (201, answer(audiences=()), "include none of"),  # an API server that ignored the audience
        (201, answer(username="kubernetes-admin"), "not a service account"),
        (201, answer(username="system:serviceaccount:shop"), "not a service account"),
        (201, answer(username="system:serviceaccount:shop:a:b"), "not a service account"),
        (201, b"<html>", "not a TokenReview"),
        (201, b'{"status": []}', "not a TokenReview"),
        (500, b"boom", "answered 500"),
    ]:
        with pytest.raises(ReviewFailed, match=words):
            parse_review(status, body, ["istio-ca"])
    assert json.loads(review_body("t", ["istio-ca"]))["spec"] == {"token": "t", "audiences": ["istio-ca"]}


def test_the_api_server_is_found_as_a_pod_finds_it(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "token").write_text("x")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert in_cluster(env, str(tmp_path)) == ApiServer("10.96.0.1", 443, str(tmp_path / "ca.crt"),
                                                       str(tmp_path / "token"))
    with pytest.raises(ValueError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster({}, str(tmp_path))
    with pytest.raises(ValueError, match="automountServiceAccountToken"):
        in_cluster(env, str(tmp_path / "missing"))


def test_token_review_outside_a_pod_exits_2_naming_the_flag(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: []\n")
    done = run_cli(["controlplane", "--mesh", str(mesh), "--state-dir", str(tmp_path / "state"), "--token-review"],
                   {"KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": ""})
    assert done.returncode == 2
    assert "--token-review: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set" in done.stderr
