"""The application probes the status port answers for kubelet: their configuration and rules.

Istio's injector rewrites a container's httpGet/tcpSocket/grpc probes to
`/app-health/<container>/{livez,readyz,startupz}` (and lifecycle hooks to
`/app-lifecycle/<container>/{prestopz,poststartz}`) on 15020 and hands the originals to the agent as
JSON in ISTIO_KUBE_APP_PROBERS; the agent runs them against the application, from 127.0.0.6 so
that the capture rules let them past Envoy (docs/istio-compat.md "Application probes"). This
module is the pure part: the configuration, checked at start, and kubelet's rules for an HTTP
probe's answer; agent/prober.py runs the probes.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from pilotfish.common.settings import ConfigError, parse_bool

from .httpclient import FIELD_VALUE, TOKEN

VARIABLE = "ISTIO_KUBE_APP_PROBERS"
LEGACY_LOCALHOST = "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"
PATH_PATTERN = re.compile(r"/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)")
SOURCE_V4 = "127.0.0.6"  # the capture rules let traffic from here past Envoy's inbound listener
SOURCE_V6 = "::6"
DEFAULT_TIMEOUT = 1.0  # seconds: kubelet's default timeoutSeconds (the API server fills it in)
MAX_REDIRECTS = 10  # kubelet's (and Go's http.Client's) limit
MAX_BODY = 10 * 1024  # of the application's answer returned to kubelet, as pilot-agent
REDIRECTS_FOLLOWED = frozenset({301, 302, 303, 307, 308})  # the ones Go's http.Client follows


@dataclass(frozen=True)
class HttpGet:
    path: str  # starts with "/"
    port: int
    https: bool
    headers: tuple[tuple[str, str], ...]  # httpHeaders, sent when kubelet's request lacks them


@dataclass(frozen=True)
class TcpSocket:
    port: int


@dataclass(frozen=True)
class Grpc:
    port: int
    service: str


@dataclass(frozen=True)
class AppProbe:
    action: HttpGet | TcpSocket | Grpc
    timeout: float  # seconds, the whole probe


@dataclass(frozen=True)
class AppProbeConfig:
    """What the prober needs: the probes by path, where they go and where they come from."""

    probes: Mapping[str, AppProbe]
    destination: str  # an IP address: INSTANCE_IP, or loopback with the legacy setting
    source: str  # 127.0.0.6 or ::6, the same family as `destination`


def app_probe_config(env: Mapping[str, str]) -> AppProbeConfig:
    """The application probes from the environment (pilot-agent's variables); ConfigError names
    the variable and the probe path when something does not parse."""
    legacy = env.get(LEGACY_LOCALHOST, "")
    destination, source = probe_addresses(env.get("INSTANCE_IP", ""),
                                          parse_bool(legacy, LEGACY_LOCALHOST) if legacy else False)
    return AppProbeConfig(parse_app_probers(env.get(VARIABLE, "")), destination, source)


def probe_addresses(instance_ip: str, legacy_localhost: bool) -> tuple[str, str]:
    """(destination, source) of the probes: the pod's IP as kubelet would probe it (or loopback
    with REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION), from 127.0.0.6, or ::6 when the pod's IP
    is IPv6 (pilot-agent's choice: a link-local IPv6 address does not count). Without an
    INSTANCE_IP, loopback."""
    try:
        ip = ipaddress.ip_address(instance_ip)
    except ValueError:
        ip = ipaddress.IPv4Address("127.0.0.1")
    v6 = isinstance(ip, ipaddress.IPv6Address) and not ip.is_link_local
    if legacy_localhost or not instance_ip:
        return ("::1", SOURCE_V6) if v6 else ("127.0.0.1", SOURCE_V4)
    return str(ip), SOURCE_V6 if v6 else SOURCE_V4


def parse_app_probers(text: str) -> dict[str, AppProbe]:
    """ISTIO_KUBE_APP_PROBERS: `{path: {httpGet|tcpSocket|grpc, timeoutSeconds}}`, as
    pilot-agent checks it (the path's form, exactly one action, ports as numbers) and a little
    more (ports in range, header names and values a request can carry). Unknown fields are
    ignored, as Go's decoder does."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{VARIABLE}: not JSON: {type(err).__name__}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{VARIABLE}: want a JSON object of probes by path, got {type(raw).__name__}")
    return {path: _probe(path, spec) for path, spec in raw.items()}


def _probe(path: str, spec: object) -> AppProbe:
    where = f"{VARIABLE}: {path!r}"
    if not PATH_PATTERN.fullmatch(path):
        raise ConfigError(f"{where}: invalid path, must match {PATH_PATTERN.pattern}")
    return probe_spec(spec, where)


def probe_spec(spec: object, where: str) -> AppProbe:
    """One probe as Kubernetes writes it (`httpGet`, `tcpSocket` or `grpc`, `timeoutSeconds`);
    also the workload's readiness probe of ProxyConfig (agent/workloadhealth.py)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: want an object, got {type(spec).__name__}")
    actions = [key for key in ("httpGet", "tcpSocket", "grpc") if spec.get(key) is not None]
    if len(actions) != 1:
        raise ConfigError(f"{where}: invalid prober type, must be exactly one of httpGet, tcpSocket or grpc")
    timeout = spec.get("timeoutSeconds") or 0
    if not _is_int(timeout) or timeout < 0:
        raise ConfigError(f"{where}: timeoutSeconds: want a whole number of seconds, got {timeout!r}")
    body = spec[actions[0]]
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: {actions[0]}: want an object, got {type(body).__name__}")
    port = _port(body.get("port"), f"{where}: {actions[0]}")
    action: HttpGet | TcpSocket | Grpc
    if actions[0] == "httpGet":
        action = _http_get(body, port, f"{where}: httpGet")
    elif actions[0] == "tcpSocket":
        action = TcpSocket(port)
    else:
        service = body.get("service") or ""
        if not isinstance(service, str):
            raise ConfigError(f"{where}: grpc: service: want a string, got {type(service).__name__}")
        action = Grpc(port, service)
    return AppProbe(action, float(timeout) if timeout else DEFAULT_TIMEOUT)


def _http_get(body: dict[str, object], port: int, where: str) -> HttpGet:
    path = body.get("path") or "/"
    scheme = str(body.get("scheme") or "HTTP").upper()  # Istio's ReadinessProbe takes it in any case
    if not isinstance(path, str) or any(c in path for c in "\r\n ") or not path.isprintable():
        raise ConfigError(f"{where}: path: want a URL path, got {path!r}")
    if scheme not in ("HTTP", "HTTPS"):
        raise ConfigError(f"{where}: scheme: want HTTP or HTTPS, got {scheme!r}")
    headers = body.get("httpHeaders") or []
    if not isinstance(headers, list):
        raise ConfigError(f"{where}: httpHeaders: want a list, got {type(headers).__name__}")
    pairs = []
    for header in headers:
        name = header.get("name") if isinstance(header, dict) else None
        value = header.get("value", "") if isinstance(header, dict) else None
        if not isinstance(name, str) or not TOKEN.fullmatch(name) \
                or not isinstance(value, str) or not FIELD_VALUE.fullmatch(value):
            raise ConfigError(f"{where}: httpHeaders: want {{name, value}} a request can carry, got {header!r}")
        pairs.append((name, value))
    return HttpGet(path if path.startswith("/") else "/" + path, port, scheme == "HTTPS", tuple(pairs))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _port(value: object, where: str) -> int:
    if not _is_int(value):  # pilot-agent: "the port must be int type" (a named port is refused)
        raise ConfigError(f"{where}: port: want a number, got {value!r}")
    assert isinstance(value, int)
    if not 1 <= value <= 65535:
        raise ConfigError(f"{where}: port: out of range: {value}")
    return value


@dataclass(frozen=True)
class Follow:
    """Follow the redirect to `url` (the Host header kept only for a relative Location, as Go does)."""

    url: str
    keep_host: bool


def after_answer(status: int, location: str | None, url: str, first_url: str, redirects: int) -> Follow | int | None:
    """kubelet's rules for an HTTP probe's answer (Go's http.Client with kubelet's redirect
    check, then pilot-agent's): a redirect Go follows to the same host is followed (Follow),
    unless `redirects` were followed already (MAX_REDIRECTS: the probe fails, 500); one to
    another host succeeds (200), and so does any other 3xx (200: an answer without its Location
    header must not go to kubelet). None: pass the application's status and body on."""
    if status in REDIRECTS_FOLLOWED and location:
        target = urljoin(url, location)
        if urlsplit(target).hostname != urlsplit(first_url).hostname:
            return 200
        if redirects >= MAX_REDIRECTS:
            return 500
        return Follow(target, keep_host=not urlsplit(location).netloc)
    if 300 <= status < 400:
        return 200
    return None
