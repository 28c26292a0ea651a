"""Workload authentication in a Kubernetes cluster: the Kubernetes TokenReview API, as istiod does.

In a pod the agent sends its projected service-account token (audience `istio-ca`,
/var/run/secrets/tokens/istio-token) as `authorization: Bearer ...`. istiod asks the API server
whether the token is valid for that audience (POST /apis/authentication.k8s.io/v1/tokenreviews)
and takes the identity from the answer's user name, `system:serviceaccount:NS:SA`
(docs/istio-compat.md "Workload certificates"). `--token-review` does the same
(docs/kubernetes.md "Authentication"); the control plane's own service account needs the right to create
tokenreviews (ClusterRole `system:auth-delegator`, deploy/kubernetes/controlplane/rbac.yaml).

`review_body` and `parse_review` are pure (a token in, the request's bytes out; the API server's
answer in, `NAMESPACE/SERVICEACCOUNT` or a refusal out); `TokenReviewer` is the HTTP shell: one
HTTPS request with the pod's own token and the cluster's CA, a timeout, the answer read up to a
bound. Every failure is a `ReviewFailed` whose message says why, for the caller to log.

Every ADS stream and every CSR is reviewed, and whoever reaches the port chooses how many: so a
vouched-for token is remembered for CACHE_TTL (never past its own `exp`), as the API server's
own webhook token cache does, and at most MAX_IN_FLIGHT reviews wait on the API server at once;
one more is refused at once ("busy") instead of holding one of the server's threads for up to
TIMEOUT. Before, 1,000 streams with junk tokens were 1,000 concurrent API calls, each holding a
gRPC worker for up to 5 s, and an agent reconnecting was a call each time.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.tokens import token_expiry

DEFAULT_AUDIENCES = ("istio-ca",)  # istiod's TOKEN_AUDIENCES default; the template's token audience
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # the pod's own token and ca.crt
PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
TIMEOUT = 5.0  # seconds for the whole review: an agent's CSR waits on it
MAX_RESPONSE = 64 * 1024  # a TokenReview answer is well under 2 KiB
MAX_TOKEN = 16 * 1024  # a projected token is ~1 KiB; a larger one is not sent on
CACHE_TTL = 60.0  # seconds a vouched-for token is remembered (kube-apiserver's webhook token cache: 2 min)
CACHE_SIZE = 4096  # tokens remembered; the oldest goes first
MAX_IN_FLIGHT = 16  # reviews waiting on the API server at once
SA_PREFIX = "system:serviceaccount:"
SA_GROUP = "system:serviceaccounts"


class ReviewFailed(Exception):
    """The token gives no identity; the message says why (for the log, never for the caller)."""


@dataclass(frozen=True)
class ApiServer:
    """Where and how to reach the API server: `host:port`, the CA bundle and this pod's token."""

    host: str
    port: int
    ca_file: str
    token_file: str


def in_cluster(env: Mapping[str, str], service_account_dir: str = SERVICE_ACCOUNT_DIR) -> ApiServer:
    """The API server as a pod sees it (what client-go's InClusterConfig reads); ValueError
    naming what is missing."""
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set "
                         f"(got {host!r}, {port!r}): --token-review runs in a Kubernetes pod")
    ca_file = os.path.join(service_account_dir, "ca.crt")
    token_file = os.path.join(service_account_dir, "token")
    for path in (ca_file, token_file):
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: is a service account token mounted "
                             "(automountServiceAccountToken)?")
    return ApiServer(host, int(port), ca_file, token_file)


def bearer_token(header: str | None) -> str | None:
    """The token of `authorization: Bearer <token>`, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def review_body(token: str, audiences: Sequence[str]) -> bytes:
    """The TokenReview to POST."""
    return json.dumps({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": list(audiences)},
    }).encode()


def parse_review(status: int, body: bytes, audiences: Sequence[str]) -> str:
    """`NAMESPACE/SERVICEACCOUNT` from the API server's answer, or ReviewFailed saying why.

    As istiod: the review must say authenticated, with no error, for one of the audiences asked
    (an API server that ignores audiences answers none, which is refused too), and the user must
    be a service account, `system:serviceaccount:NS:SA` in the `system:serviceaccounts` group.
    """
    if status == 403:
        raise ReviewFailed("the API server refused the review (403): the control plane's service account "
                           "may not create tokenreviews (bind it to ClusterRole system:auth-delegator)")
    if status != 201 and status != 200:
        raise ReviewFailed(f"the API server answered {status}: {_excerpt(body)}")
    try:
        review = json.loads(body)
        result = review["status"]
        if not isinstance(result, dict):
            raise TypeError("status is not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise ReviewFailed(f"the API server's answer is not a TokenReview ({err}): {_excerpt(body)}") from None
    if result.get("error"):
        raise ReviewFailed(f"token not authenticated: {result['error']}")
    if result.get("authenticated") is not True:
        raise ReviewFailed("token not authenticated")
    granted = result.get("audiences") or []
    if not isinstance(granted, list) or not set(map(str, granted)) & set(audiences):
        raise ReviewFailed(f"token audiences {granted} include none of {list(audiences)}")
    user = result.get("user")
    user = user if isinstance(user, dict) else {}
    name = str(user.get("username", ""))
    groups = user.get("groups") or []
    parts = name[len(SA_PREFIX):].split(":") if name.startswith(SA_PREFIX) else []
    if len(parts) != 2 or not all(parts):
        raise ReviewFailed(f"user {name!r} is not a service account (system:serviceaccount:NAMESPACE:NAME)")
    if not isinstance(groups, list) or SA_GROUP not in groups:
        raise ReviewFailed(f"user {name!r} is not in the group {SA_GROUP}")
    return f"{parts[0]}/{parts[1]}"


def _excerpt(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace")
    return repr(text + ("..." if len(body) > 200 else ""))


class TokenReviewer:
    """Asks the API server about a bearer token: `review(token)` gives `NAMESPACE/SA` or raises
    ReviewFailed (the API server unreachable, slow, answering too much or something else, the
    token refused). Blocking; called on a gRPC worker thread."""

    def __init__(self, api: ApiServer, audiences: Sequence[str] = DEFAULT_AUDIENCES, timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.audiences = tuple(audiences)
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[bytes, tuple[str, float]] = {}  # sha256(token) -> (identity, good until)
        self._cache_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def _context(self) -> ssl.SSLContext:
        # made per review: the CA bundle may be rotated under a running pod
        return ssl.create_default_context(cafile=self.api.ca_file)

    def review(self, token: str) -> str:
        if len(token) > MAX_TOKEN:
            raise ReviewFailed(f"token longer than {MAX_TOKEN} bytes")
        key, now = hashlib.sha256(token.encode()).digest(), self._clock()
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and now < cached[1]:
                return cached[0]
        if not self._slots.acquire(blocking=False):
            raise ReviewFailed(f"busy: {MAX_IN_FLIGHT} reviews are already waiting on the API server")
        try:
            identity = self._ask(token)
        finally:
            self._slots.release()
        expiry = token_expiry(token)
        until = min(now + CACHE_TTL, expiry if expiry is not None else now + CACHE_TTL)
        with self._cache_lock:
            self._cache.pop(key, None)
            self._cache[key] = (identity, until)
            while len(self._cache) > CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
        return identity

    def _ask(self, token: str) -> str:
        """One review by the API server."""
        try:
            own = read_regular_file(self.api.token_file, MAX_TOKEN).decode("utf-8", "replace").strip()
        except UnreadableFile as err:
            raise ReviewFailed(f"cannot read this pod's service account token {self.api.token_file}: {err}") from None
        try:
            connection = http.client.HTTPSConnection(self.api.host, self.api.port, timeout=self.timeout,
                                                     context=self._context())
        except (OSError, ssl.SSLError) as err:
            raise ReviewFailed(f"cannot use the cluster CA {self.api.ca_file}: {err}") from None
        where = f"https://{self.api.host}:{self.api.port}"
        try:
            connection.request("POST", PATH, body=review_body(token, self.audiences), headers={
                "Authorization": f"Bearer {own}", "Content-Type": "application/json", "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read(MAX_RESPONSE + 1)
        except (OSError, http.client.HTTPException) as err:  # refused, timed out, TLS, a broken answer
            raise ReviewFailed(f"cannot reach the API server at {where}: {err}") from None
        finally:
            connection.close()
        if len(body) > MAX_RESPONSE:
            raise ReviewFailed(f"the API server at {where} answered more than {MAX_RESPONSE} bytes")
        return parse_review(response.status, body, self.audiences)
