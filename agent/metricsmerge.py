"""The merged `/stats/prometheus` of the status port: the agent's metrics, Envoy's, the application's.

pilot-agent answers Prometheus with one exposition (docs/istio-compat.md "Metrics merging"): the
agent's registry, then Envoy's `localhost:15090/stats/prometheus` (PILOT_AGENT_MERGE_ENVOY_STATS,
default true), then the application's targets from ISTIO_PROMETHEUS_ANNOTATIONS (the injector
writes the pod's `prometheus.io/*` annotations there). The targets are asked for what the scraper
accepts (Envoy text only; the application OpenMetrics too), and the answer takes the
application's format. A target that fails, answers other than 200, or is over its size cap is
left out and counted (`istio_agent_scrape_failures_total{type}`); the scrape never fails.

The configuration, the content negotiation and the merge are pure; MetricsMerge does the I/O.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as text_exposition
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_exposition

from pilotfish.common.ratelog import RateLimitedLog
from pilotfish.common.settings import ConfigError, parse_bool

from . import httpclient

log = logging.getLogger("pilotfish.status")

ANNOTATIONS = "ISTIO_PROMETHEUS_ANNOTATIONS"
MERGE_ENVOY = "PILOT_AGENT_MERGE_ENVOY_STATS"
ENVOY_PROMETHEUS_PORT = 15090
APP_MAX_BODY = 10 * 1024 * 1024  # pilot-agent's cap on an application target
# Envoy's own exposition grows with the mesh (~100 series per cluster): pilot-agent streams it
# uncapped; buffered here, it gets a cap several times an application's
ENVOY_MAX_BODY = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0  # seconds, Prometheus's default scrape_timeout, when the scraper sends none
MAX_TIMEOUT = 60.0
TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_0_0_1 = "application/openmetrics-text; version=0.0.1; charset=utf-8"
OPENMETRICS_1_0_0 = "application/openmetrics-text; version=1.0.0; charset=utf-8"
ENVOY_TYPES = ("text/*", "text/plain")  # Envoy's body is copied as it is: never OpenMetrics, whose # EOF ends it
APP_TYPES = ("text/*", "text/plain", "application/openmetrics-text")
# Ports of Istio's data plane an application target may not name (pilot-agent's list)
RESERVED_PORTS = {15000: "Envoy admin", 15001: "outbound traffic capture", 15004: "pilot debug",
                  15006: "inbound traffic capture", 15008: "HBONE tunnel",
                  15020: "pilot-agent status / merged Prometheus", 15021: "Envoy health", 15053: "DNS proxy",
                  15090: "Envoy Prometheus (already merged)"}
EOF_MARK = b"# EOF"
_TSPECIALS = frozenset(' ()<>@,;:\\"/[]?=\t')  # RFC 2045: not in a token


@dataclass(frozen=True)
class Target:
    port: int
    path: str


@dataclass(frozen=True)
class MetricsConfig:
    envoy: Target | None = None
    apps: tuple[Target, ...] = ()


def metrics_config(env: Mapping[str, str], status_port: int, *, envoy: bool, sidecar: bool) -> MetricsConfig:
    """The targets merged into the status port's metrics, from pilot-agent's variables. `envoy`:
    an Envoy runs beside the agent; `sidecar`: the proxy type is sidecar (pilot-agent merges the
    application's metrics for sidecars only: 15020 is exposed on gateways' Services)."""
    merge = env.get(MERGE_ENVOY, "")
    envoy_target = Target(ENVOY_PROMETHEUS_PORT, "/stats/prometheus") \
        if envoy and (parse_bool(merge, MERGE_ENVOY) if merge else True) else None
    apps = app_targets(env[ANNOTATIONS], status_port) if sidecar and ANNOTATIONS in env else ()
    return MetricsConfig(envoy_target, apps)


def app_targets(text: str, status_port: int) -> tuple[Target, ...]:
    """ISTIO_PROMETHEUS_ANNOTATIONS: `{"scrape", "path", "port"}` (path default /metrics, port 80)
    or, newer, `{"targets": [{"port", "path"}]}`; `"scrape": "false"` turns it off. A port that
    is the status port (a scrape of itself) or one of Istio's is refused, as pilot-agent does."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{ANNOTATIONS}: not JSON: {type(err).__name__}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{ANNOTATIONS}: want a JSON object, got {type(raw).__name__}")
    if raw.get("scrape") == "false":
        return ()
    listed = raw.get("targets") or [{"port": raw.get("port") or "80", "path": raw.get("path") or "/metrics"}]
    if not isinstance(listed, list) or not all(isinstance(t, dict) for t in listed):
        raise ConfigError(f"{ANNOTATIONS}: targets: want a list of {{port, path}}, got {listed!r}")
    targets = []
    for entry in listed:
        port_text, path = entry.get("port"), entry.get("path") or "/metrics"
        if not isinstance(port_text, str) or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"{ANNOTATIONS}: invalid target port {port_text!r}")
        port = int(port_text)
        if port == status_port:
            raise ConfigError(f"{ANNOTATIONS}: target port {port} is the status port: it would scrape itself")
        if port in RESERVED_PORTS:
            raise ConfigError(f"{ANNOTATIONS}: target port {port} is reserved for Istio ({RESERVED_PORTS[port]})")
        if not isinstance(path, str) or not path.startswith("/") or not path.isprintable() or " " in path:
            raise ConfigError(f"{ANNOTATIONS}: invalid target path {path!r}")
        targets.append(Target(port, path))
    return tuple(targets)


def _media_type(text: str) -> tuple[str, dict[str, str]]:
    """Go's mime.ParseMediaType, near enough: the lower-case type and its parameters; ValueError
    when it does not parse."""
    kind, *params = text.split(";")
    kind = kind.strip().lower()
    if not kind or _TSPECIALS & set(kind.replace("/", "", 1)):
        raise ValueError(f"bad media type {text!r}")
    if params and not params[-1].strip():
        params.pop()  # a trailing ";" is allowed, an empty parameter elsewhere is not
    out = {}
    for param in params:
        name, sep, value = param.partition("=")
        name, value = name.strip().lower(), value.strip()
        quoted = len(value) >= 2 and value[0] == value[-1] == '"'
        if not sep or not name or name in out or not (quoted or value) or _TSPECIALS & set(name) \
                or (not quoted and _TSPECIALS & set(value)):
            raise ValueError(f"bad parameter {param!r}")
        out[name] = value[1:-1] if quoted else value
    return kind, out


def _format_media_type(kind: str, params: Mapping[str, str]) -> str:
    return "; ".join([kind, *(f"{k}={params[k]}" for k in sorted(params))])


def accept_for_target(accept: str, allowed: Sequence[str]) -> str:
    """The Accept header for a target, from the scraper's (pilot-agent's allowedContentTypes):
    the types the target may answer, in the scraper's order with q falling from 0.n; `*` and
    `*/*` read as text 0.0.4, `application/*` as OpenMetrics 0.0.1; text 0.0.4 when nothing is
    left or the header does not parse."""
    fallback = "text/plain;version=0.0.4"
    try:
        encodings = [_media_type(part) for part in accept.split(",")]
    except ValueError:
        return fallback
    kept: list[tuple[str, dict[str, str]]] = []
    seen: set[str] = set()
    for kind, params in encodings:
        params.pop("q", None)
        wildcard = kind in ("*", "*/*", "application/*")
        if kind in ("*", "*/*"):
            kind, params = "text/plain", {"version": "0.0.4"}
        elif kind == "application/*":
            kind, params = "application/openmetrics-text", {"version": "0.0.1"}
        key = _format_media_type(kind, params)
        if kind not in allowed or (wildcard and key in seen):  # a type named twice stays twice, as in Istio
            continue
        seen.add(key)
        kept.append((kind, params))
    if not kept:
        return fallback
    return ",".join(_format_media_type(kind, {**params, "q": f"0.{len(kept) - i}"}) for i, (kind, params) in
                    enumerate(kept))


def answer_format(content_type: str) -> str:
    """The exposition format a target's Content-Type means (pilot-agent's negotiateMetricsFormat)."""
    try:
        kind, params = _media_type(content_type)
    except ValueError:
        return TEXT
    if kind == "application/openmetrics-text":
        if params.get("version") == "1.0.0":
            return OPENMETRICS_1_0_0
        if params.get("version", "") in ("0.0.1", ""):
            return OPENMETRICS_0_0_1
    return TEXT


def merged_format(app_content_types: Sequence[str]) -> str:
    """The answer's format: the first answering application target's, text when the targets
    disagree (one exposition cannot be both) or none answered."""
    formats = {answer_format(ct) for ct in app_content_types}
    return formats.pop() if len(formats) == 1 else TEXT


def strip_eof(body: bytes) -> bytes:
    """`body` without a final OpenMetrics `# EOF` line (trailing blanks around it tolerated)."""
    trimmed = body.rstrip(b" \t\r\n")
    return trimmed[:-len(EOF_MARK)] if trimmed.endswith(EOF_MARK) else body


def merge(fmt: str, agent: bytes, envoy: bytes | None, apps: Sequence[bytes]) -> bytes:
    """One exposition: the agent's (already in `fmt`), Envoy's as it came, the applications'
    without their `# EOF`; one `# EOF` at the end when `fmt` is OpenMetrics. Each part ends with
    a newline before the next begins."""
    parts = [agent, *([envoy] if envoy is not None else []), *(strip_eof(app) for app in apps)]
    out = bytearray()
    for part in parts:
        out += part
        if part and not part.endswith(b"\n"):
            out += b"\n"
    if fmt != TEXT:
        out += EOF_MARK + b"\n"
    return bytes(out)


def render_agent(registry: CollectorRegistry, fmt: str) -> bytes:
    """The agent's registry in `fmt` (OpenMetrics without its `# EOF`: merge adds the last one).
    pilot-agent writes its own in text whatever the format; in OpenMetrics here, so that the
    agent's part of an OpenMetrics answer parses as such."""
    if fmt == TEXT:
        return text_exposition(registry)
    return strip_eof(openmetrics_exposition(registry))


@dataclass(frozen=True)
class Scrape:
    """What the targets answered for one request (None: left out)."""

    envoy: bytes | None
    apps: list[tuple[str, bytes]]  # (Content-Type, body) of each application target that answered


class MetricsMerge:
    """Scrapes the targets of `config` for each request, counting scrapes and failures as
    pilot-agent does (register it in the agent's registry: StatusServer does)."""

    def __init__(self, config: MetricsConfig | None = None, host: str = "localhost") -> None:
        self.config = config if config is not None else MetricsConfig()
        self.host = host
        self.scrapes = 0
        self.failures = {"envoy": 0, "application": 0, "agent": 0}
        # a line per kind per 10 s at most: a target down fails every scrape
        self.warn = {kind: RateLimitedLog(log) for kind in self.failures}

    async def scrape(self, headers: Sequence[tuple[str, str]], query: str) -> Scrape:
        """Ask every target at once, each within the scraper's timeout
        (X-Prometheus-Scrape-Timeout-Seconds, else DEFAULT_TIMEOUT; at most MAX_TIMEOUT).
        Envoy gets the request's query (`?usedonly`, `?filter=`), as pilot-agent passes it on."""
        self.scrapes += 1
        given = {k.lower(): v for k, v in headers}
        timeout = _timeout(given.get("x-prometheus-scrape-timeout-seconds", ""))
        passed = [(k, given[k.lower()]) for k in ("User-Agent", "X-Prometheus-Scrape-Timeout-Seconds")
                  if k.lower() in given]
        accept = given.get("accept", "")
        envoy: list[bytes] = []
        apps: list[tuple[str, bytes] | None] = [None] * len(self.config.apps)

        async def fetch_envoy(target: Target) -> None:
            path = target.path + (f"?{query}" if query else "")
            reply = await self._fetch("envoy", target, path, passed, accept_for_target(accept, ENVOY_TYPES), timeout,
                                      ENVOY_MAX_BODY)
            if reply is not None:
                envoy.append(reply.body)

        async def fetch_app(index: int, target: Target) -> None:
            reply = await self._fetch("application", target, target.path, passed,
                                      accept_for_target(accept, APP_TYPES), timeout, APP_MAX_BODY)
            if reply is not None:
                apps[index] = (reply.headers.get("content-type", ""), reply.body)

        async with trio.open_nursery() as nursery:
            if self.config.envoy is not None:
                nursery.start_soon(fetch_envoy, self.config.envoy)
            for index, target in enumerate(self.config.apps):
                nursery.start_soon(fetch_app, index, target)
        return Scrape(envoy[0] if envoy else None, [app for app in apps if app is not None])

    async def _fetch(self, kind: str, target: Target, path: str, headers: list[tuple[str, str]], accept: str,
                     timeout: float, max_body: int) -> httpclient.Reply | None:
        try:
            reply = await httpclient.get(self.host, target.port, path, [*headers, ("Accept", accept)],
                                         timeout=timeout, max_body=max_body)
        except httpclient.FetchError as err:
            why = str(err)
        else:
            if reply.status == 200 and not reply.over:
                return reply
            why = f"response over {max_body} bytes" if reply.over else f"status code {reply.status}"
        self.failures[kind] += 1
        self.warn[kind](logging.WARNING, "status: failed scraping %s metrics at port %d %r: %s", kind, target.port,
                        target.path, why)
        return None

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("istio_agent_scrapes", "The total number of scrapes.", value=self.scrapes)
        failures = CounterMetricFamily("istio_agent_scrape_failures", "The total number of failed scrapes.",
                                       labels=["type"])
        for kind, count in self.failures.items():
            failures.add_metric([kind], count)
        yield failures


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(value, MAX_TIMEOUT) if value > 0 else DEFAULT_TIMEOUT
