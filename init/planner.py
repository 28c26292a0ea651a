"""The rule planner: the typed capture settings and what was detected at run time in, the rules of
each address family out. Pure. One function per step of istio-iptables' capture run, called in
its emission order (docs/istio-compat.md "istio-iptables rules"), so the restore text is rule for
rule Istio's. Rules are built as data (rules.py) and rendered there, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .config import Capture, CaptureConfig, Detected, Nameserver
from .rules import (
    ACCEPT,
    DROP,
    RETURN,
    TCP,
    UDP,
    V4,
    V6,
    Chain,
    ConnMark,
    ConnState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    Host,
    InInterface,
    Jump,
    Mark,
    Match,
    OutInterface,
    Owner,
    Redirect,
    RestoreMark,
    Rule,
    SaveMark,
    SetMark,
    Source,
    SourcePort,
    Spec,
    Table,
    Target,
    TProxy,
    families,
    render,
)

__all__ = ["Detected", "Plan", "Rule", "V4", "V6", "plan"]

DNS_PORT = 53
DNS_PROXY_PORT = 15053  # the agent's DNS proxy
OUTBOUND_MARK = 1338  # Istio's fixed mark for the proxy's own lo traffic in TPROXY mode
# Conntrack zones of DNS: 1 for the agent's flows to the upstream servers, 2 for the app's to the
# agent, so the two legs of one query never share a conntrack entry.
UPSTREAM_ZONE, APP_ZONE = 1, 2

NAT, MANGLE, RAW = Table.NAT, Table.MANGLE, Table.RAW
PREROUTING, OUTPUT = Chain.PREROUTING, Chain.OUTPUT
INBOUND, REDIRECT, IN_REDIRECT = Chain.ISTIO_INBOUND, Chain.ISTIO_REDIRECT, Chain.ISTIO_IN_REDIRECT
OUTPUT_CHAIN, OUTPUT_DNS = Chain.ISTIO_OUTPUT, Chain.ISTIO_OUTPUT_DNS
LO = "lo"


@dataclass
class Plan:
    """The rules of each family, in emission order. `families` lists the ones to apply."""

    rules: dict[int, list[Rule]] = field(default_factory=lambda: {V4: [], V6: []})
    families: tuple[int, ...] = (V4,)
    redirect_dns: bool = False  # DNS capture after the no-nameserver check


@dataclass(frozen=True)
class _Run:
    """What every step reads: the settings, the proxy's owners (uids, then gids), the DNS servers
    and whether DNS is captured."""

    capture: Capture
    owners: tuple[Owner, ...]
    nameservers: tuple[Nameserver, ...]
    redirect_dns: bool

    def servers(self, version: int) -> list[Nameserver]:
        return [s for s in self.nameservers if s.version == version]


class _Out:
    """The rule lists being built: a spec goes to every enabled family (`both`), or to one."""

    def __init__(self, enabled: tuple[Family, ...]) -> None:
        self.families = {f.version: f for f in enabled}
        self.rules: dict[int, list[Rule]] = {V4: [], V6: []}

    def both(self, table: Table, chain: Chain, *matches: Match, to: Target, insert: int | None = None) -> None:
        for version in self.families:
            self.only(version, table, chain, *matches, to=to, insert=insert)

    def only(self, version: int, table: Table, chain: Chain, *matches: Match, to: Target,
             insert: int | None = None) -> None:
        family = self.families.get(version)
        if family is not None:
            self.rules[version].append(render(Spec(table, chain, matches, to, insert), family))


def plan(config: CaptureConfig, detected: Detected) -> Plan:
    """The rules istio-iptables would install for this configuration."""
    capture = config.capture
    nameservers = detected.nameservers
    run = _Run(
        capture=capture,
        owners=tuple(Owner(u) for u in detected.uids) + tuple(Owner(g, group=True) for g in detected.gids),
        nameservers=nameservers,
        # Istio drops DNS capture (with a warning) when there is no nameserver to capture
        redirect_dns=capture.redirect_dns and (capture.capture_all_dns or bool(nameservers)),
    )
    enabled = families(capture.ipv4_loopback, detected.enable_ipv6)
    out = _Out(enabled)
    for step in STEPS:
        step(out, run)
    return Plan(out.rules, tuple(f.version for f in enabled), run.redirect_dns)


def _exclude_interfaces(out: _Out, run: _Run) -> None:
    """Step 1: traffic on an excluded interface is never captured."""
    for iface in run.capture.exclude_interfaces:
        out.both(NAT, PREROUTING, InInterface(iface), to=RETURN)
        out.both(NAT, OUTPUT, OutInterface(iface), to=RETURN)
    if run.capture.tproxy:  # TPROXY captures in mangle: exclude there too
        for iface in run.capture.exclude_interfaces:
            out.both(MANGLE, PREROUTING, InInterface(iface), to=RETURN)
            out.both(MANGLE, OUTPUT, OutInterface(iface), to=RETURN)


def _virtual_interfaces(out: _Out, run: _Run) -> None:
    """Step 2: what arrives on a virtual interface (a KubeVirt VM's) is outbound, not inbound: keep
    it out of the inbound capture (step 18 sends it to the outbound one)."""
    for iface in run.capture.virtual_interfaces:
        out.both(NAT, PREROUTING, InInterface(iface), to=RETURN, insert=1)


def _drop_invalid(out: _Out, run: _Run) -> None:
    """Step 3: drop packets conntrack finds invalid, which would otherwise reach the app uncaptured
    (an out-of-window segment of a redirected connection)."""
    if run.capture.drop_invalid:
        out.both(MANGLE, PREROUTING, ConnState(("INVALID",)), to=Jump(Chain.ISTIO_DROP))
        out.both(MANGLE, Chain.ISTIO_DROP, to=DROP)


def _redirect_chains(out: _Out, run: _Run) -> None:
    """Steps 4-6: the tunnel port (HBONE) is never captured inbound; the two chains every capture
    ends in, to Envoy's outbound listener and to its inbound one."""
    c = run.capture
    out.both(NAT, INBOUND, TCP, DestinationPort(c.inbound_tunnel_port), to=RETURN)
    out.both(NAT, REDIRECT, TCP, to=Redirect(c.envoy_port))
    out.both(NAT, IN_REDIRECT, TCP, to=Redirect(c.inbound_capture_port))


def _inbound(out: _Out, run: _Run) -> None:
    """Step 7: inbound TCP to the captured ports goes to Envoy's inbound listener (REDIRECT in nat,
    or TPROXY in mangle, which keeps the original destination)."""
    c = run.capture
    if not c.capture_inbound:
        return
    table = MANGLE if c.tproxy else NAT
    if c.tproxy:
        # marked packets are accepted (routed to lo by the TPROXY `ip rule`); new ones diverted to
        # the inbound port, except to a loopback address
        out.both(MANGLE, Chain.ISTIO_DIVERT, to=SetMark(c.tproxy_mark))
        out.both(MANGLE, Chain.ISTIO_DIVERT, to=ACCEPT)
        out.both(MANGLE, Chain.ISTIO_TPROXY, Destination(Host.LOOPBACK, negate=True), TCP,
                 to=TProxy(c.inbound_capture_port, c.tproxy_mark))
    out.both(table, PREROUTING, TCP, to=Jump(INBOUND))
    established = ConnState(("RELATED", "ESTABLISHED"))
    if c.inbound_ports is None:  # every port, but the excluded ones (-d)
        for port in c.local_exclude_ports:
            out.both(table, INBOUND, TCP, DestinationPort(port), to=RETURN)
        if c.tproxy:
            out.both(MANGLE, INBOUND, TCP, established, to=Jump(Chain.ISTIO_DIVERT))
            out.both(MANGLE, INBOUND, TCP, to=Jump(Chain.ISTIO_TPROXY))
        else:
            out.both(NAT, INBOUND, TCP, to=Jump(IN_REDIRECT))
        return
    for port in c.inbound_ports:  # only the listed ports (-d does not apply)
        if c.tproxy:
            out.both(MANGLE, INBOUND, TCP, DestinationPort(port), established, to=Jump(Chain.ISTIO_DIVERT))
            out.both(MANGLE, INBOUND, TCP, DestinationPort(port), to=Jump(Chain.ISTIO_TPROXY))
        else:
            out.both(NAT, INBOUND, TCP, DestinationPort(port), to=Jump(IN_REDIRECT))


def _outbound_jump(out: _Out, run: _Run) -> None:
    """Step 8: every locally generated packet goes through the outbound chain."""
    out.both(NAT, OUTPUT, to=Jump(OUTPUT_CHAIN))


def _outbound_exclude_ports(out: _Out, run: _Run) -> None:
    """Step 9: ports never captured outbound (-o), TCP and UDP."""
    for port in run.capture.outbound_exclude_ports:
        out.both(NAT, OUTPUT_CHAIN, TCP, DestinationPort(port), to=RETURN)
        out.both(NAT, OUTPUT_CHAIN, UDP, DestinationPort(port), to=RETURN)


def _inbound_passthrough(out: _Out, run: _Run) -> None:
    """Step 10: Envoy's inbound passthrough connects to the app from 127.0.0.6 (::6) over lo; it
    must reach the app, not the outbound listener."""
    out.both(NAT, OUTPUT_CHAIN, OutInterface(LO), Source(Host.PASSTHROUGH), to=RETURN)


def _proxy_owners(out: _Out, run: _Run) -> None:
    """Steps 11-12: per uid then per gid of the proxy (in TPROXY mode Envoy runs as uid 0, gid 1337),
    the proxy's own traffic."""
    tunnel = run.capture.inbound_tunnel_port
    loopback_include = any(c.ip.is_loopback for c in run.capture.include_cidrs or ())
    for owner in run.owners:
        # The proxy's TCP over lo to a non-loopback address (a service VIP resolved to its own pod
        # IP) is inbound traffic for this pod: to the inbound listener. With DNS capture the uid
        # form spares port 53 too (Istio's gid form does not).
        if run.redirect_dns and not owner.group:
            skip: Match = DestinationPorts((DNS_PORT, tunnel), negate=True)
        else:
            skip = DestinationPort(tunnel, negate=True)
        out.both(NAT, OUTPUT_CHAIN, OutInterface(LO), Destination(Host.LOOPBACK, negate=True), TCP, skip, owner,
                 to=Jump(IN_REDIRECT))
        # The app talking to itself over lo is not captured (unless an include CIDR is loopback);
        # with DNS capture, its DNS over lo still is.
        if not loopback_include:
            others = replace(owner, negate=True)
            if run.redirect_dns:
                out.both(NAT, OUTPUT_CHAIN, OutInterface(LO), TCP, DestinationPort(DNS_PORT, negate=True), others,
                         to=RETURN)
            else:
                out.both(NAT, OUTPUT_CHAIN, OutInterface(LO), others, to=RETURN)
        # Anything else the proxy sends goes out as it is.
        out.both(NAT, OUTPUT_CHAIN, owner, to=RETURN)


def _owner_groups(out: _Out, run: _Run) -> None:
    """Step 13: only the processes of the included groups (ISTIO_OUTBOUND_OWNER_GROUPS) are
    captured, or all but the excluded ones; one rule lists every included group."""
    include = run.capture.owner_groups_include
    if include is None:
        for group in run.capture.owner_groups_exclude:
            out.both(NAT, OUTPUT_CHAIN, Owner(group, group=True), to=RETURN)
    else:
        out.both(NAT, OUTPUT_CHAIN, *(Owner(g, group=True, negate=True) for g in include), to=RETURN)


def _dns(out: _Out, run: _Run) -> None:
    """Step 14: DNS to the agent's proxy, with the conntrack zones that keep its flows apart."""
    if not run.redirect_dns:
        return
    capture_all = run.capture.capture_all_dns
    out.both(RAW, OUTPUT, to=Jump(OUTPUT_DNS))
    for version in (V4, V6):  # only a family with servers to capture (or capture-all) jumps
        if capture_all or run.servers(version):
            out.only(version, NAT, OUTPUT_CHAIN, to=Jump(OUTPUT_DNS))
    # Port 53, to every server or to the ones in resolv.conf, goes to the agent.
    for proto, plural in ((TCP, True), (UDP, False)):
        if capture_all:
            out.both(NAT, OUTPUT_DNS, proto, DestinationPort(DNS_PORT), to=Redirect(DNS_PROXY_PORT, plural))
            continue
        for server in run.nameservers:
            out.only(server.version, NAT, OUTPUT_DNS, proto, DestinationPort(DNS_PORT), Destination(server),
                     to=Redirect(DNS_PROXY_PORT, plural))
    # The proxy's own queries upstream and its answers to the app: first, as the first CT wins.
    for owner in run.owners:
        out.both(RAW, OUTPUT_DNS, UDP, DestinationPort(DNS_PORT), owner, to=CtZone(UPSTREAM_ZONE))
        out.both(RAW, OUTPUT_DNS, UDP, SourcePort(DNS_PROXY_PORT), owner, to=CtZone(APP_ZONE))
    # The app's queries and the upstream answers.
    if capture_all:
        out.both(RAW, PREROUTING, to=Jump(INBOUND))
        out.both(RAW, OUTPUT_DNS, UDP, DestinationPort(DNS_PORT), to=CtZone(APP_ZONE))
        out.both(RAW, INBOUND, UDP, SourcePort(DNS_PORT), to=CtZone(UPSTREAM_ZONE))
        return
    for version in (V4, V6):
        servers = run.servers(version)
        if servers:
            out.only(version, RAW, PREROUTING, to=Jump(INBOUND))
        for server in servers:
            out.only(version, RAW, OUTPUT_DNS, UDP, DestinationPort(DNS_PORT), Destination(server),
                     to=CtZone(APP_ZONE))
            out.only(version, RAW, INBOUND, UDP, SourcePort(DNS_PORT), Source(server), to=CtZone(UPSTREAM_ZONE))


def _outbound_exclude_cidrs(out: _Out, run: _Run) -> None:
    """Steps 15-16: explicit loopback destinations and the excluded CIDRs (-x) are not captured."""
    out.both(NAT, OUTPUT_CHAIN, Destination(Host.LOOPBACK), to=RETURN)
    for cidr in run.capture.exclude_cidrs:
        out.only(cidr.version, NAT, OUTPUT_CHAIN, Destination(cidr), to=RETURN)


def _outbound_ports(out: _Out, run: _Run) -> None:
    """Step 17: ports always captured outbound (-q), whatever the destination."""
    for port in run.capture.outbound_ports:
        out.both(NAT, OUTPUT_CHAIN, TCP, DestinationPort(port), to=Jump(REDIRECT))


def _outbound_include(out: _Out, run: _Run) -> None:
    """Step 18: outbound traffic to the included CIDRs (-i, `*` for all) goes to Envoy's outbound
    listener, and so does what a virtual interface sends there. A family's rules come from its own
    CIDRs only: an IPv4-only list captures nothing in IPv6."""
    virtual = run.capture.virtual_interfaces
    include = run.capture.include_cidrs
    if include is None:
        out.both(NAT, OUTPUT_CHAIN, to=Jump(REDIRECT))
        for iface in virtual:
            out.both(NAT, PREROUTING, InInterface(iface), to=Jump(REDIRECT), insert=1)
        return
    for cidr in include:
        for iface in virtual:
            out.only(cidr.version, NAT, PREROUTING, InInterface(iface), Destination(cidr), to=Jump(REDIRECT),
                     insert=1)
        out.only(cidr.version, NAT, OUTPUT_CHAIN, Destination(cidr), to=Jump(REDIRECT))


def _tproxy_tail(out: _Out, run: _Run) -> None:
    """Step 19 (TPROXY, with or without -b): the marks that route the replies of diverted
    connections back through lo, and keep the proxy's own traffic out of the inbound capture."""
    c = run.capture
    if not c.tproxy:
        return
    mark = c.tproxy_mark
    out.both(MANGLE, PREROUTING, TCP, Mark(mark), to=SaveMark())
    out.both(MANGLE, OUTPUT, TCP, OutInterface(LO), Mark(mark), to=RETURN)
    # The proxy's own TCP over lo to a non-loopback address gets the outbound mark.
    for owner in run.owners:
        out.both(MANGLE, OUTPUT, Destination(Host.LOOPBACK, negate=True), TCP, OutInterface(LO), owner,
                 to=SetMark(OUTBOUND_MARK))
    out.both(MANGLE, OUTPUT, TCP, ConnMark(mark), to=RestoreMark())
    # Ahead of the inbound capture: marked packets, the inbound passthrough, and lo traffic
    # without the outbound mark pass.
    out.both(MANGLE, INBOUND, TCP, Mark(mark), to=RETURN, insert=1)
    out.both(MANGLE, INBOUND, TCP, Source(Host.PASSTHROUGH), InInterface(LO), to=RETURN, insert=2)
    out.both(MANGLE, INBOUND, TCP, InInterface(LO), Mark(OUTBOUND_MARK, negate=True), to=RETURN, insert=3)


# Istio's capture run, in emission order (docs/istio-compat.md "istio-iptables rules").
STEPS: tuple[Callable[[_Out, _Run], None], ...] = (
    _exclude_interfaces,
    _virtual_interfaces,
    _drop_invalid,
    _redirect_chains,
    _inbound,
    _outbound_jump,
    _outbound_exclude_ports,
    _inbound_passthrough,
    _proxy_owners,
    _owner_groups,
    _dns,
    _outbound_exclude_cidrs,
    _outbound_ports,
    _outbound_include,
    _tproxy_tail,
)
