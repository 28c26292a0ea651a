"""The rule planner: a capture configuration and what was detected at run time in, the rules of
each address family out. Pure; follows istio-iptables' emission order exactly
(docs/istio-compat.md "istio-iptables rules"), so the restore text is rule for rule Istio's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import CaptureConfig, cidr_text, parse_cidrs, split_list

DNS_PORT = "53"
DNS_PROXY_PORT = "15053"
OUTBOUND_MARK = "1338"  # Istio's fixed mark for the proxy's own lo traffic in TPROXY mode
V4, V6 = 4, 6
LO_CIDR = "<lo-cidr>"  # placeholders replaced per family ("versioned" rules)
INBOUND_PASSTHROUGH = "<passthrough>"


@dataclass(frozen=True)
class Detected:
    """What istio-iptables detects at run time; tests inject it."""

    enable_ipv6: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    proxy_uid: str = "1337"  # resolved -u (ENVOY_USER's uid when -u is empty)
    proxy_gid: str = "1337"  # resolved -g (the uid string when -g is empty)


@dataclass(frozen=True)
class Rule:
    """One rule: `-A CHAIN args` or, with `insert`, `-I CHAIN insert args`."""

    table: str
    chain: str
    args: tuple[str, ...]
    insert: int | None = None

    def text(self) -> str:
        head = f"-I {self.chain} {self.insert}" if self.insert is not None else f"-A {self.chain}"
        return " ".join((head, *self.args))

    @property
    def target(self) -> str | None:
        """The chain or target of a trailing `-j X` (how Istio spots jumps)."""
        return self.args[-1] if len(self.args) >= 2 and self.args[-2] == "-j" else None


@dataclass
class Plan:
    """The rules of each family, in emission order. `families` lists the ones to apply."""

    rules: dict[int, list[Rule]] = field(default_factory=lambda: {V4: [], V6: []})
    families: tuple[int, ...] = (V4,)
    redirect_dns: bool = False  # DNS capture after the no-nameserver check


class _Builder:
    def __init__(self, enable_ipv6: bool, lo4: str) -> None:
        self.rules: dict[int, list[Rule]] = {V4: [], V6: []}
        self.ipv6 = enable_ipv6
        self.values = {V4: {LO_CIDR: lo4, INBOUND_PASSTHROUGH: "127.0.0.6/32"},
                       V6: {LO_CIDR: "::1/128", INBOUND_PASSTHROUGH: "::6/128"}}

    def add(self, family: int, table: str, chain: str, *args: str, insert: int | None = None) -> None:
        if family == V6 and not self.ipv6:
            return
        values = self.values[family]
        resolved = tuple(values.get(a, a) for a in args)
        self.rules[family].append(Rule(table, chain, resolved, insert))

    def both(self, table: str, chain: str, *args: str, insert: int | None = None) -> None:
        self.add(V4, table, chain, *args, insert=insert)
        self.add(V6, table, chain, *args, insert=insert)


def plan(config: CaptureConfig, detected: Detected) -> Plan:
    """The rules istio-iptables would install for this configuration."""
    b = _Builder(detected.enable_ipv6, config.ipv4_loopback_cidr)
    tproxy = config.tproxy
    p, z, e = config.envoy_port, config.inbound_capture_port, config.inbound_tunnel_port
    mark = config.inbound_tproxy_mark
    uids = split_list(detected.proxy_uid)
    gids = split_list(detected.proxy_gid)
    dns_v4, dns_v6 = detected.dns_servers_v4, detected.dns_servers_v6
    capture_all = config.capture_all_dns
    redirect_dns = config.redirect_dns and (capture_all or bool(dns_v4 or dns_v6))
    include = parse_cidrs(config.service_cidr, "-i")
    exclude = parse_cidrs(config.service_exclude_cidr, "-x") or []
    virt = split_list(config.kube_virt_interfaces)

    # 1. Excluded interfaces (and again in mangle for TPROXY).
    for iface in split_list(config.exclude_interfaces):
        b.both("nat", "PREROUTING", "-i", iface, "-j", "RETURN")
        b.both("nat", "OUTPUT", "-o", iface, "-j", "RETURN")
    if tproxy:
        for iface in split_list(config.exclude_interfaces):
            b.both("mangle", "PREROUTING", "-i", iface, "-j", "RETURN")
            b.both("mangle", "OUTPUT", "-o", iface, "-j", "RETURN")
    # 2. Traffic arriving on virtual interfaces is outbound.
    for iface in virt:
        b.both("nat", "PREROUTING", "-i", iface, "-j", "RETURN", insert=1)
    # 3. Drop conntrack-invalid packets.
    if config.drop_invalid:
        b.both("mangle", "PREROUTING", "-m", "conntrack", "--ctstate", "INVALID", "-j", "ISTIO_DROP")
        b.both("mangle", "ISTIO_DROP", "-j", "DROP")
    # 4-6. Tunnel port exemption and the two redirect chains.
    b.both("nat", "ISTIO_INBOUND", "-p", "tcp", "--dport", e, "-j", "RETURN")
    b.both("nat", "ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", p)
    b.both("nat", "ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", z)
    # 7. Inbound.
    if config.inbound_ports:
        table = "mangle" if tproxy else "nat"
        if tproxy:
            b.both("mangle", "ISTIO_DIVERT", "-j", "MARK", "--set-mark", mark)
            b.both("mangle", "ISTIO_DIVERT", "-j", "ACCEPT")
            b.both("mangle", "ISTIO_TPROXY", "!", "-d", LO_CIDR, "-p", "tcp", "-j", "TPROXY",
                   "--tproxy-mark", f"{mark}/0xffffffff", "--on-port", z)
        b.both(table, "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND")
        if config.inbound_ports == "*":
            for port in split_list(config.local_exclude_ports):
                b.both(table, "ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-j", "RETURN")
            if tproxy:
                b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "-m", "conntrack", "--ctstate",
                       "RELATED,ESTABLISHED", "-j", "ISTIO_DIVERT")
                b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_TPROXY")
            else:
                b.both("nat", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT")
        else:
            for port in split_list(config.inbound_ports):
                if tproxy:
                    b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-m", "conntrack",
                           "--ctstate", "RELATED,ESTABLISHED", "-j", "ISTIO_DIVERT")
                    b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-j", "ISTIO_TPROXY")
                else:
                    b.both("nat", "ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-j", "ISTIO_IN_REDIRECT")
    # 8-10. Outbound dispatch, excluded ports, Envoy's inbound passthrough source.
    b.both("nat", "OUTPUT", "-j", "ISTIO_OUTPUT")
    for port in split_list(config.local_outbound_ports_exclude):
        b.both("nat", "ISTIO_OUTPUT", "-p", "tcp", "--dport", port, "-j", "RETURN")
        b.both("nat", "ISTIO_OUTPUT", "-p", "udp", "--dport", port, "-j", "RETURN")
    b.both("nat", "ISTIO_OUTPUT", "-o", "lo", "-s", INBOUND_PASSTHROUGH, "-j", "RETURN")
    # 11-12. The proxy's own traffic.
    loopback_include = any(c.ip.is_loopback for c in include or [])
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            if redirect_dns and owner == "--uid-owner":
                b.both("nat", "ISTIO_OUTPUT", "-o", "lo", "!", "-d", LO_CIDR, "-p", "tcp", "-m", "multiport",
                       "!", "--dports", f"{DNS_PORT},{e}", "-m", "owner", owner, ident, "-j", "ISTIO_IN_REDIRECT")
            else:
                b.both("nat", "ISTIO_OUTPUT", "-o", "lo", "!", "-d", LO_CIDR, "-p", "tcp", "!", "--dport", e,
                       "-m", "owner", owner, ident, "-j", "ISTIO_IN_REDIRECT")
            if not loopback_include:
                if redirect_dns:
                    b.both("nat", "ISTIO_OUTPUT", "-o", "lo", "-p", "tcp", "!", "--dport", DNS_PORT,
                           "-m", "owner", "!", owner, ident, "-j", "RETURN")
                else:
                    b.both("nat", "ISTIO_OUTPUT", "-o", "lo", "-m", "owner", "!", owner, ident, "-j", "RETURN")
            b.both("nat", "ISTIO_OUTPUT", "-m", "owner", owner, ident, "-j", "RETURN")
    # 13. Owner groups.
    if config.owner_groups_include == "*":
        for group in split_list(config.owner_groups_exclude):
            b.both("nat", "ISTIO_OUTPUT", "-m", "owner", "--gid-owner", group, "-j", "RETURN")
    else:
        negations: list[str] = []
        for group in split_list(config.owner_groups_include):
            negations += ["-m", "owner", "!", "--gid-owner", group]
        b.both("nat", "ISTIO_OUTPUT", *negations, "-j", "RETURN")
    # 14. DNS.
    if redirect_dns:
        _dns(b, capture_all, dns_v4, dns_v6, uids, gids)
    # 15-16. Localhost and excluded CIDRs.
    b.both("nat", "ISTIO_OUTPUT", "-d", LO_CIDR, "-j", "RETURN")
    for family in (V4, V6):
        for cidr in exclude:
            if cidr.version == family:
                b.add(family, "nat", "ISTIO_OUTPUT", "-d", cidr_text(cidr), "-j", "RETURN")
    # 17. Ports always captured.
    for port in split_list(config.outbound_ports):
        b.both("nat", "ISTIO_OUTPUT", "-p", "tcp", "--dport", port, "-j", "ISTIO_REDIRECT")
    # 18. Outbound include, per family.
    for family in (V4, V6):
        if include is None:
            b.add(family, "nat", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT")
            for iface in virt:
                b.add(family, "nat", "PREROUTING", "-i", iface, "-j", "ISTIO_REDIRECT", insert=1)
        else:
            for cidr in include:
                if cidr.version != family:
                    continue
                text = cidr_text(cidr)
                for iface in virt:
                    b.add(family, "nat", "PREROUTING", "-i", iface, "-d", text, "-j", "ISTIO_REDIRECT", insert=1)
                b.add(family, "nat", "ISTIO_OUTPUT", "-d", text, "-j", "ISTIO_REDIRECT")
    # 19. TPROXY tail.
    if tproxy:
        b.both("mangle", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark")
        b.both("mangle", "OUTPUT", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
        for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
            for ident in ids:
                b.both("mangle", "OUTPUT", "!", "-d", LO_CIDR, "-p", "tcp", "-o", "lo", "-m", "owner", owner,
                       ident, "-j", "MARK", "--set-mark", OUTBOUND_MARK)
        b.both("mangle", "OUTPUT", "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark")
        b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN", insert=1)
        b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "-s", INBOUND_PASSTHROUGH, "-i", "lo", "-j", "RETURN", insert=2)
        b.both("mangle", "ISTIO_INBOUND", "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK,
               "-j", "RETURN", insert=3)
    families = (V4, V6) if detected.enable_ipv6 else (V4,)
    return Plan(b.rules, families, redirect_dns)


def _dns(b: _Builder, capture_all: bool, dns_v4: tuple[str, ...], dns_v6: tuple[str, ...],
         uids: list[str], gids: list[str]) -> None:
    """Istio's DNS step: redirect port 53 to the agent, and keep its conntrack flows apart."""
    servers = {V4: [(s, "32") for s in dns_v4], V6: [(s, "128") for s in dns_v6]}
    b.both("raw", "OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
    for family in (V4, V6):
        if capture_all or servers[family]:
            b.add(family, "nat", "ISTIO_OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
    for proto, to in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if capture_all:
            b.both("nat", "ISTIO_OUTPUT_DNS", "-p", proto, "--dport", DNS_PORT, "-j", "REDIRECT", to, DNS_PROXY_PORT)
            continue
        for family in (V4, V6):
            for server, bits in servers[family]:
                b.add(family, "nat", "ISTIO_OUTPUT_DNS", "-p", proto, "--dport", DNS_PORT, "-d", f"{server}/{bits}",
                      "-j", "REDIRECT", to, DNS_PROXY_PORT)
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            b.both("raw", "ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", DNS_PORT, "-m", "owner", owner, ident,
                   "-j", "CT", "--zone", "1")
            b.both("raw", "ISTIO_OUTPUT_DNS", "-p", "udp", "--sport", DNS_PROXY_PORT, "-m", "owner", owner, ident,
                   "-j", "CT", "--zone", "2")
    if capture_all:
        b.both("raw", "PREROUTING", "-j", "ISTIO_INBOUND")
        b.both("raw", "ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", DNS_PORT, "-j", "CT", "--zone", "2")
        b.both("raw", "ISTIO_INBOUND", "-p", "udp", "--sport", DNS_PORT, "-j", "CT", "--zone", "1")
        return
    for family in (V4, V6):
        if servers[family]:
            b.add(family, "raw", "PREROUTING", "-j", "ISTIO_INBOUND")
        for server, bits in servers[family]:
            b.add(family, "raw", "ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", DNS_PORT, "-d", f"{server}/{bits}",
                  "-j", "CT", "--zone", "2")
            b.add(family, "raw", "ISTIO_INBOUND", "-p", "udp", "--sport", DNS_PORT, "-s", f"{server}/{bits}",
                  "-j", "CT", "--zone", "1")
