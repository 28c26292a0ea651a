"""`pilot-agent request` and `pilot-agent wait`: the words that talk to the pod's own ports
(docs/istio-compat.md "pilot-agent words").

`request [--debug-port N] METHOD PATH [BODY]` sends one request to localhost:N (default 15000,
Envoy's admin; only 15000, 15004, 15020 and 15021 are allowed, as Istio's), prints the body and
fails on a status over 399 but 404. The injection template's preStop hook is
`pilot-agent request --debug-port=15020 POST drain`. Nothing else is printed on stdout:
`istioctl proxy-config` reads it as JSON.

`wait [--timeoutSeconds 60] [--requestTimeoutMillis 500] [--periodMillis 500] [--url U]` polls
U (default http://localhost:15021/healthz/ready) until it answers 200 (the template's
postStart hook when `holdApplicationUntilProxyStarts` is on).

Only the standard library is imported: these run in kubelet's hooks, on every pod stop.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import sys
import time
import urllib.parse

log = logging.getLogger("pilotfish.agent")

ALLOWED_PORTS = (15000, 15004, 15020, 15021)
REQUEST_TIMEOUT = 60.0  # seconds, Istio's client timeout
MAX_BODY = 64 << 20  # what `request` prints at most (a config_dump of a large mesh is tens of MiB)
MAX_PROBE_BODY = 64 << 10  # what `wait` reads of an answer before judging it


class RequestFailed(Exception):
    pass


def exchange(host: str, port: int, method: str, path: str, body: bytes, timeout: float,
             limit: int) -> tuple[int, bytes]:
    """(status, body) of one request within `timeout` a step; RequestFailed when the body is over
    `limit`, OSError or HTTPException when the exchange fails."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None)
        response = conn.getresponse()
        data = response.read(limit + 1)
        if len(data) > limit:
            raise RequestFailed(f"the answer is larger than {limit} bytes")
        return response.status, data
    finally:
        conn.close()


def request(port: int, method: str, path: str, body: str = "", timeout: float = REQUEST_TIMEOUT) -> bytes:
    """The answer's body; RequestFailed for a refused port, a failed exchange or a status > 399 (not 404)."""
    if port not in ALLOWED_PORTS:
        raise RequestFailed(f"debug port {port} is not in allowed list {list(ALLOWED_PORTS)}")
    try:
        status, data = exchange("localhost", port, method, "/" + path.lstrip("/"), body.encode(), timeout, MAX_BODY)
    except (OSError, http.client.HTTPException) as err:
        raise RequestFailed(f"{method} {path} to localhost:{port}: {err}") from None
    if status > 399 and status != 404:
        raise RequestFailed(f"received unsuccessful status code {status}: {data.decode(errors='replace')}")
    return data


def probe(url: str, timeout: float) -> str | None:
    """None when `url` answers 200, else why not."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return f"want an http:// URL, got {url!r}"
    try:
        status, _ = exchange(parts.hostname, parts.port or 80, "GET", parts.path or "/", b"", timeout, MAX_PROBE_BODY)
    except (OSError, http.client.HTTPException, RequestFailed) as err:
        return str(err) or type(err).__name__
    return None if status == 200 else f"HTTP status code {status}"


def wait(url: str, timeout_s: float, period_s: float, request_timeout_s: float) -> str | None:
    """Poll `url` every `period_s` (the first time too, as Istio's) until 200 (None) or
    `timeout_s` passed (the last error)."""
    deadline = time.monotonic() + timeout_s
    error = "never tried"
    while True:
        time.sleep(max(0.0, min(period_s, deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            return error
        why = probe(url, request_timeout_s)
        if why is None:
            return None
        error = why
        log.debug("wait: not ready yet: %s", why)


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
    """`request` or `wait` (one module: both are cheap)."""
    (_add_request if name == "request" else _add_wait)(sub)


def _add_request(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("request", help="make an HTTP request to Envoy's admin API or the agent (pilot-agent request)",
                       allow_abbrev=False)
    p.add_argument("--debug-port", type=int, default=15000, help="local port (default 15000, Envoy's admin)")
    p.add_argument("method")
    p.add_argument("path")
    p.add_argument("body", nargs="?", default="")
    p.set_defaults(run=run_request)


def _add_wait(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("wait", help="wait until the proxy is ready (pilot-agent wait)", allow_abbrev=False)
    p.add_argument("--timeoutSeconds", type=int, default=60, help="seconds to wait at most (default 60)")
    p.add_argument("--requestTimeoutMillis", type=int, default=500, help="milliseconds per request (default 500)")
    p.add_argument("--periodMillis", type=int, default=500, help="milliseconds between requests (default 500)")
    p.add_argument("--url", default="http://localhost:15021/healthz/ready", help="what to poll")
    p.set_defaults(run=run_wait)


def run_request(args: argparse.Namespace) -> int:
    try:
        data = request(args.debug_port, args.method, args.path, args.body)
    except RequestFailed as err:
        log.error("request: %s", err)
        return 1
    sys.stdout.buffer.write(data + b"\n")
    sys.stdout.flush()
    return 0


def run_wait(args: argparse.Namespace) -> int:
    log.info("Waiting for Envoy proxy to be ready (timeout: %d seconds)...", args.timeoutSeconds)
    error = wait(args.url, args.timeoutSeconds, args.periodMillis / 1000, args.requestTimeoutMillis / 1000)
    if error is not None:
        log.error("timeout waiting for Envoy proxy to become ready. Last error: %s", error)
        return 1
    log.info("Envoy is ready!")
    return 0
