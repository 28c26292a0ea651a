"""Configuration of the DNS proxy, and the pure parsers of its own settings: upstreams, and
DNS_PROXY_ADDR with its loopback-family rule (docs/istio-compat.md
"DNS proxy settings and sockets"). The parsers every command shares (Go durations and booleans,
host:port, resolv.conf) are in common/settings.py and common/resolv.py.

Every parser raises ConfigError naming the setting and the bad value, so the command can exit
before it binds or forwards anything.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pilotfish.common.resolv import ResolvConf
from pilotfish.common.settings import ConfigError, split_host_port

DEFAULT_PROXY_ADDR = "localhost:15053"
ISTIO_RESOLV_CONF = "/var/lib/istio/resolv.conf"  # used by root on :53, as Istio does
# The most of resolv.conf that is read: kubelet's own bound on the node's resolv.conf it builds
# pods' from (docs/istio-compat.md "resolv.conf"). A real one is a few lines.
RESOLV_CONF_MAX = 10 << 20


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
    """Where to listen, per Istio's rules (docs/istio-compat.md "DNS proxy settings and sockets").

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
