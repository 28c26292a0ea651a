"""What istio-iptables detects at run time (docs/istio-compat.md "istio-iptables configuration"):
the proxy's uid and gid, whether
IPv6 rules are needed, and the DNS servers to capture. `--ipv6` and `--resolv-conf` override the
detection, so tests and unusual pods can say what they want."""

from __future__ import annotations

import grp
import ipaddress
import pwd
import socket

from pilotfish.common.netfacts import local_addresses
from pilotfish.common.resolv import parse_resolv_conf

from .config import CaptureConfig, ConfigError, Detected

DEFAULT_PROXY_UID = "1337"


def detect(config: CaptureConfig) -> Detected:
    """Resolve everything the planner needs; ConfigError (naming the setting) when it cannot."""
    uid = config.proxy_uid or _envoy_uid(config.envoy_user)
    gid = config.proxy_gid or uid
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()
    if config.redirect_dns and not config.capture_all_dns:
        v4, v6 = dns_servers(config.resolv_conf)
    return Detected(ipv6_enabled(config), v4, v6, uid, gid)


def _envoy_uid(user: str) -> str:
    try:
        return str(pwd.getpwnam(user).pw_uid)
    except KeyError:
        return DEFAULT_PROXY_UID


def dns_servers(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """resolv.conf's nameservers that are IP addresses, split by family, in Go netip's text."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            servers = parse_resolv_conf(f.read()).nameservers
    except OSError as err:
        raise ConfigError(f"--resolv-conf: cannot read {path}: {err.strerror}") from None
    v4, v6 = [], []
    for server in servers:
        try:
            ip = ipaddress.ip_address(server)
        except ValueError:
            continue
        mapped = getattr(ip, "ipv4_mapped", None)
        if ip.version == 4:
            v4.append(str(ip))
        else:
            v6.append(f"::ffff:{mapped}" if mapped else str(ip))
    return tuple(v4), tuple(v6)


def ipv6_enabled(config: CaptureConfig) -> bool:
    """`--ipv6 on|off`, or istio-iptables' rule: the first global address decides (any address,
    with --dual-stack). A namespace without a global address is an error, as in Istio."""
    if config.ipv6 != "auto":
        return config.ipv6 == "on"
    addresses = local_addresses()
    if not addresses:
        raise ConfigError("--ipv6 auto: no valid local IP address found (use --ipv6 on|off to say)")
    if config.dual_stack:
        return any(a.version == 6 for a in addresses)
    return addresses[0].version == 6


def user_id(name: str) -> str:
    """A uid for iptables' owner match: numbers as they are, names through NSS."""
    if name.isdigit():
        return name
    try:
        return str(pwd.getpwnam(name).pw_uid)
    except KeyError:
        raise ConfigError(f"user {name!r} does not exist") from None


def group_id(name: str) -> str:
    if name.isdigit():
        return name
    try:
        return str(grp.getgrnam(name).gr_gid)
    except KeyError:
        raise ConfigError(f"group {name!r} does not exist") from None


def check_names(config: CaptureConfig, detected: Detected) -> None:
    """Every user and group the rules name must exist before a rule is written (iptables would
    fail half way through)."""
    capture = config.capture
    checks = [("-u/--proxy-uid", user_id, detected.uids),
              ("-g/--proxy-gid", group_id, detected.gids),
              ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", group_id, capture.owner_groups_exclude)]
    if capture.owner_groups_include is not None:
        checks.append(("ISTIO_OUTBOUND_OWNER_GROUPS", group_id, capture.owner_groups_include))
    for setting, resolve, names in checks:
        for name in names:
            try:
                resolve(name)
            except ConfigError as err:
                raise ConfigError(f"{setting}: {err}") from None


def host_is_ipv6() -> bool:
    """The validation probe's family: that of the first global address (IPv4 when none)."""
    try:
        addresses = local_addresses()
    except OSError:
        return False
    return bool(addresses) and addresses[0].version == 6 and socket.has_ipv6
