"""Runs the application probes (agent/appprobe.py) for the status server, on trio.

Each probe goes to the application from the probe source address (127.0.0.6 or ::6), within its
timeout: an HTTP GET (agent/httpclient.py) with kubelet's redirect rules, a TCP connect, or a
gRPC health check (agent/grpchealth.py). The status server bounds how many run at once
(agent/status.py); this module runs one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from pilotfish.common.ratelog import RateLimitedLog

from . import grpchealth, httpclient
from .appprobe import MAX_BODY, AppProbe, AppProbeConfig, Follow, Grpc, HttpGet, after_answer

log = logging.getLogger("pilotfish.probes")

# kubelet's request headers that describe its own connection, not the probe: not forwarded
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade",
                        "content-length", "trailer"})
USER_AGENT = "pilotfish-probe"


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    body: bytes = b""


class AppProber:
    """The probes of one pod: `config` from app_probe_config()."""

    def __init__(self, config: AppProbeConfig) -> None:
        self.config = config
        self._authority = f"[{config.destination}]" if ":" in config.destination else config.destination
        # a line per probe per 10 s at most: anyone who reaches the port can make probes fail
        self._log = {path: RateLimitedLog(log, clock=trio.current_time) for path in config.probes}

    def knows(self, path: str) -> bool:
        """Whether `path` (%-escapes decoded) is a configured probe."""
        return path in self.config.probes

    async def probe(self, path: str, headers: Sequence[tuple[str, str]], status_port: int) -> ProbeAnswer:
        """Run the probe at `path` (knows(path) must hold) for a request with `headers` that came
        to `status_port`; 200 or the application's status, 500 when it fails."""
        probe = self.config.probes[path]
        action = probe.action
        try:
            with trio.fail_after(probe.timeout):
                if isinstance(action, HttpGet):
                    return await self._http(path, action, probe, headers, status_port)
                stream = await httpclient.connect(self.config.destination, action.port, self.config.source)
                async with stream:
                    if isinstance(action, Grpc):
                        agent = next((v for k, v in headers if k.lower() == "user-agent"), USER_AGENT)
                        serving = await grpchealth.check(stream, f"{self._authority}:{action.port}", action.service,
                                                         agent)
                        if serving != grpchealth.SERVING:
                            self._log[path](logging.INFO, "probe %s: gRPC health status %d, not SERVING", path,
                                            serving)
                            return ProbeAnswer(500)
                return ProbeAnswer(200)
        # ValueError: a Location that does not parse (Go's client fails the probe on it too)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, grpchealth.GrpcProbeError, ValueError) as err:
            self._log[path](logging.INFO, "probe %s failed: %s", path,
                            f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
            return ProbeAnswer(500)

    async def _http(self, path: str, action: HttpGet, probe: AppProbe, headers: Sequence[tuple[str, str]],
                    status_port: int) -> ProbeAnswer:
        """kubelet's request headers forwarded (the Host's port rewritten when it names the status
        port, as pilot-agent does), the probe's httpHeaders added where kubelet sent none; the
        redirects followed as kubelet would."""
        host = next((v for k, v in headers if k.lower() == "host"), f"{self._authority}:{action.port}")
        name, _, port = host.rpartition(":")
        if name and port == str(status_port):
            host = f"{name}:{action.port}"
        forwarded = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        sent = {k.lower() for k, _ in forwarded}
        forwarded += [(k, v) for k, v in action.headers if k.lower() not in sent]
        if "user-agent" not in sent | {k.lower() for k, _ in action.headers}:
            forwarded.append(("User-Agent", USER_AGENT))
        scheme = "https" if action.https else "http"
        first = url = f"{scheme}://{self._authority}:{action.port}{action.path}"
        redirects = 0
        while True:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or parts.hostname is None:
                self._log[path](logging.INFO, "probe %s: cannot follow a redirect to %s", path, url)
                return ProbeAnswer(500)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                reply = await httpclient.get(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                             target, [("Host", host), *forwarded], timeout=probe.timeout,
                                             max_body=MAX_BODY, source=self.config.source,
                                             tls=parts.scheme == "https")
            except httpclient.FetchError as err:
                self._log[path](logging.INFO, "probe %s: request to %s failed: %s", path, url, err)
                return ProbeAnswer(500)
            verdict = after_answer(reply.status, reply.headers.get("location"), url, first, redirects)
            if not isinstance(verdict, Follow):
                return ProbeAnswer(verdict) if verdict is not None else ProbeAnswer(reply.status, reply.body)
            if not verdict.keep_host:
                host = urlsplit(verdict.url).netloc
            url, redirects = verdict.url, redirects + 1
