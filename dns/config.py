"""Configuration of the DNS proxy, and the pure parsers for Istio's settings: Go durations and
booleans, resolv.conf, DNS_PROXY_ADDR with its loopback-family rule (reference §1, §2, §7.1).

Every parser raises ConfigError naming the setting and the bad value, so the command can exit
before it binds or forwards anything.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

DEFAULT_PROXY_ADDR = "localhost:15053"
ISTIO_RESOLV_CONF = "/var/lib/istio/resolv.conf"  # used by root on :53, as Istio does
# The most of resolv.conf that is read: kubelet's own bound on the node's resolv.conf it builds
# pods' from (maxResolvConfLength, pkg/kubelet/network/dns/dns.go). A real one is a few lines.
RESOLV_CONF_MAX = 10 << 20


class ConfigError(ValueError):
    """A setting has a bad value; the message names both."""


@dataclass(frozen=True)
class DnsConfig:
    """Everything the proxy needs; defaults are Istio's where Istio has one."""

    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 15053),)
    upstreams: tuple[tuple[str, int], ...] = ()  # nameservers, (host, port)
    search: tuple[str, ...] = ()  # resolv.conf search list
    proxy_namespace: str = ""
    proxy_domain: str = ""
    forward_parallel: bool = False
    forward_timeout: float = 5.0  # seconds, per upstream exchange
    forward_before_table: bool = False  # Istio's respondBeforeSync (root on :53)
    cache_size: int = 10_000  # upstream answers kept; 0 turns the cache off
    cache_max_ttl: float = 300.0
    cache_negative_ttl: float = 30.0
    cache_stale: float = 86_400.0  # RFC 8767 suggests 1–3 days
    cache_max_bytes: int = 4 << 20  # dns/cache.py DEFAULT_MAX_BYTES
    max_inflight: int | None = None  # forwards in flight; None: sized by the open-files limit
    max_tcp_connections: int | None = None  # None: sized by the open-files limit


@dataclass(frozen=True)
class ResolvConf:
    """The parts of resolv.conf Istio uses (miekg's ClientConfigFromReader)."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = field(default_factory=tuple)


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str, setting: str) -> float:
    """Seconds from Go's time.ParseDuration syntax (`300ms`, `5s`, `1m30s`); `0` alone is 0."""
    value = text.strip()
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-")
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ConfigError(f"{setting}: invalid duration {text!r} (Go syntax, e.g. 300ms, 5s)")
    return sign * total


def parse_bool(text: str, setting: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConfigError(f"{setting}: invalid boolean {text!r} (true or false)")


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers in order, as written; `search` replaces the list, `domain X` makes it [X]."""
    servers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        if words[0] == "nameserver" and len(words) > 1:
            servers.append(words[1])
        elif words[0] == "search":
            search = words[1:]
        elif words[0] == "domain" and len(words) > 1:
            search = [words[1]]
    return ResolvConf(tuple(servers), tuple(search))


def split_host_port(text: str, setting: str) -> tuple[str, int]:
    """Go's net.SplitHostPort plus a port range check: `host:port`, `[v6]:port`."""
    m = re.fullmatch(r"\[([^\]]*)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise ConfigError(f"{setting}: invalid address {text!r} (want host:port or [ipv6]:port)")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(f"{setting}: port out of range in {text!r}")
    return host, port


def parse_upstream(text: str, setting: str) -> tuple[str, int]:
    """An upstream nameserver: an IP, `ip:port` or `[ipv6]:port` (port 53 when omitted)."""
    value = text.strip()
    try:
        return str(ipaddress.ip_address(value.strip("[]"))), 53
    except ValueError:
        pass
    try:
        host, port = split_host_port(value, setting)
        return str(ipaddress.ip_address(host)), port
    except (ConfigError, ValueError):
        raise ConfigError(f"{setting}: {text!r} is not an IP, IP:port or [IPv6]:port") from None


def upstreams_from_resolv(conf: ResolvConf) -> tuple[tuple[str, int], ...]:
    """Istio dials every nameserver on port 53, as written."""
    return tuple((ns, 53) for ns in conf.nameservers)


def listen_addresses(
    addr: str, nameservers: tuple[str, ...], is_root: bool, setting: str = "DNS_PROXY_ADDR"
) -> tuple[tuple[tuple[str, int], ...], bool, str | None]:
    """Where to listen, per Istio's rules (reference §2).

    Returns (addresses, forward_before_table, warning). An empty value means localhost:15053.
    Port 53 needs root: then queries are forwarded even before the first table (Istio's
    respondBeforeSync); without root the address falls back to localhost:15053 with a warning.
    `localhost` listens on 127.0.0.1 if any nameserver is IPv4 and on ::1 if any is IPv6 (both
    when both are present); with no IP nameserver, on 127.0.0.1.
    """
    warning = None
    host, port = split_host_port(addr or DEFAULT_PROXY_ADDR, setting)
    before_table = False
    if port == 53:
        if is_root:
            before_table = True
        else:
            warning = f"{setting}={addr}: port 53 needs root; listening on {DEFAULT_PROXY_ADDR}"
            host, port = split_host_port(DEFAULT_PROXY_ADDR, setting)
    if host != "localhost":
        return ((host or "0.0.0.0", port),), before_table, warning
    families = set()
    for ns in nameservers:
        try:
            families.add(ipaddress.ip_address(ns.partition("%")[0]).version)
        except ValueError:
            continue
    out = []
    if 4 in families or not families:
        out.append(("127.0.0.1", port))
    if 6 in families:
        out.append(("::1", port))
    return tuple(out), before_table, warning
