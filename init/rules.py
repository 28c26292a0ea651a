"""Capture rules as data, and the one place they become iptables words. Pure.

A `Spec` is a table, a chain, an ordered list of typed matches (addresses, ports, interfaces,
owners, marks) and a typed target, after Kuma's transparent proxy, whose rules are built from
parameters and rendered once. `render` turns a spec into a `Rule` (the words iptables-restore
reads) for one address family, resolving the addresses that differ per family. The matches keep
Istio's order of arguments, which varies from rule to rule (`-p udp --dport 53 -d s/32`, but
`! -d <lo> -p tcp -o lo`), so the restore text is Istio's word for word
(docs/istio-compat.md "istio-iptables rules").
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum, StrEnum

from .config import Cidr, Nameserver, PortRange, cidr_text

V4, V6 = 4, 6


class Table(StrEnum):
    MANGLE = "mangle"
    NAT = "nat"
    RAW = "raw"


class Chain(StrEnum):
    PREROUTING = "PREROUTING"
    OUTPUT = "OUTPUT"
    ISTIO_INBOUND = "ISTIO_INBOUND"
    ISTIO_REDIRECT = "ISTIO_REDIRECT"
    ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
    ISTIO_OUTPUT = "ISTIO_OUTPUT"
    ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
    ISTIO_DIVERT = "ISTIO_DIVERT"
    ISTIO_TPROXY = "ISTIO_TPROXY"
    ISTIO_DROP = "ISTIO_DROP"


class Verdict(StrEnum):
    RETURN = "RETURN"
    ACCEPT = "ACCEPT"
    DROP = "DROP"


class Host(Enum):
    """An address whose value depends on the family (Istio's "versioned" rules)."""

    LOOPBACK = "loopback"  # ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR; ::1/128
    PASSTHROUGH = "passthrough"  # the source of Envoy's inbound passthrough: 127.0.0.6/32; ::6/128


@dataclass(frozen=True)
class Family:
    """One address family's rule set and its values for the `Host` addresses."""

    version: int
    loopback: Cidr
    passthrough: Cidr


def families(ipv4_loopback: Cidr, ipv6: bool) -> tuple[Family, ...]:
    v4 = Family(V4, ipv4_loopback, ipaddress.ip_interface("127.0.0.6/32"))
    v6 = Family(V6, ipaddress.ip_interface("::1/128"), ipaddress.ip_interface("::6/128"))
    return (v4, v6) if ipv6 else (v4,)


Address = Cidr | Host | Nameserver  # a nameserver stands for its host prefix (/32, /128)
Port = int | PortRange


# Matches, each rendered as iptables writes it; `negate` puts a `!` before the option.
@dataclass(frozen=True)
class Source:
    address: Address
    negate: bool = False


@dataclass(frozen=True)
class Destination:
    address: Address
    negate: bool = False


@dataclass(frozen=True)
class InInterface:
    name: str


@dataclass(frozen=True)
class OutInterface:
    name: str


@dataclass(frozen=True)
class Protocol:
    name: str  # tcp or udp


TCP, UDP = Protocol("tcp"), Protocol("udp")


@dataclass(frozen=True)
class DestinationPort:
    port: Port
    negate: bool = False


@dataclass(frozen=True)
class SourcePort:
    port: Port


@dataclass(frozen=True)
class DestinationPorts:
    """`-m multiport [!] --dports a,b`."""

    ports: tuple[int, ...]
    negate: bool = False


@dataclass(frozen=True)
class Owner:
    """`-m owner [!] --uid-owner ID` (`--gid-owner` for a group); ID a number or a name."""

    ident: str
    group: bool = False
    negate: bool = False


@dataclass(frozen=True)
class Mark:
    """`-m mark [!] --mark M`."""

    mark: int
    negate: bool = False


@dataclass(frozen=True)
class ConnMark:
    """`-m connmark --mark M`."""

    mark: int


@dataclass(frozen=True)
class ConnState:
    """`-m conntrack --ctstate A,B`."""

    states: tuple[str, ...]


Match = (Source | Destination | InInterface | OutInterface | Protocol | DestinationPort | SourcePort
         | DestinationPorts | Owner | Mark | ConnMark | ConnState)


# Targets.
@dataclass(frozen=True)
class Jump:
    to: Chain | Verdict


@dataclass(frozen=True)
class Redirect:
    port: int
    plural: bool = True  # Istio's UDP DNS redirect writes --to-port (iptables reads both)


@dataclass(frozen=True)
class TProxy:
    port: int
    mark: int


@dataclass(frozen=True)
class SetMark:
    mark: int


@dataclass(frozen=True)
class SaveMark:
    """`-j CONNMARK --save-mark`: the packet's mark onto its connection."""


@dataclass(frozen=True)
class RestoreMark:
    """`-j CONNMARK --restore-mark`: the connection's mark onto the packet."""


@dataclass(frozen=True)
class CtZone:
    zone: int


Target = Jump | Redirect | TProxy | SetMark | SaveMark | RestoreMark | CtZone
RETURN, ACCEPT, DROP = Jump(Verdict.RETURN), Jump(Verdict.ACCEPT), Jump(Verdict.DROP)


@dataclass(frozen=True)
class Spec:
    """A rule as data: appended to `chain`, or inserted at `insert` (1-based)."""

    table: Table
    chain: Chain
    matches: tuple[Match, ...]
    target: Target
    insert: int | None = None


@dataclass(frozen=True)
class Rule:
    """One rule as iptables words: `-A CHAIN args` or, with `insert`, `-I CHAIN insert args`."""

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


def render(spec: Spec, family: Family) -> Rule:
    """The spec as iptables words for `family`: the only place rule text is made."""
    words = [word for match in spec.matches for word in _match(match, family)]
    words += _target(spec.target)
    return Rule(str(spec.table), str(spec.chain), tuple(words), spec.insert)


def _not(negate: bool) -> list[str]:
    return ["!"] if negate else []


def _address(address: Address, family: Family) -> str:
    if address is Host.LOOPBACK:
        return cidr_text(family.loopback)
    if address is Host.PASSTHROUGH:
        return cidr_text(family.passthrough)
    if isinstance(address, Nameserver):
        return f"{address.text}/{address.address.max_prefixlen}"
    assert not isinstance(address, Host)
    return cidr_text(address)


def _port(port: Port) -> str:
    if isinstance(port, int):
        return str(port)
    return str(port.first) if port.first == port.last else f"{port.first}:{port.last}"


def _match(match: Match, family: Family) -> list[str]:
    match match:
        case Source(address, negate):
            return [*_not(negate), "-s", _address(address, family)]
        case Destination(address, negate):
            return [*_not(negate), "-d", _address(address, family)]
        case InInterface(name):
            return ["-i", name]
        case OutInterface(name):
            return ["-o", name]
        case Protocol(name):
            return ["-p", name]
        case DestinationPort(port, negate):
            return [*_not(negate), "--dport", _port(port)]
        case SourcePort(port):
            return ["--sport", _port(port)]
        case DestinationPorts(ports, negate):
            return ["-m", "multiport", *_not(negate), "--dports", ",".join(map(str, ports))]
        case Owner(ident, group, negate):
            return ["-m", "owner", *_not(negate), "--gid-owner" if group else "--uid-owner", ident]
        case Mark(mark, negate):
            return ["-m", "mark", *_not(negate), "--mark", str(mark)]
        case ConnMark(mark):
            return ["-m", "connmark", "--mark", str(mark)]
        case ConnState(states):
            return ["-m", "conntrack", "--ctstate", ",".join(states)]


def _target(target: Target) -> list[str]:
    match target:
        case Jump(to):
            return ["-j", str(to)]
        case Redirect(port, plural):
            return ["-j", "REDIRECT", "--to-ports" if plural else "--to-port", str(port)]
        case TProxy(port, mark):
            return ["-j", "TPROXY", "--tproxy-mark", f"{mark}/0xffffffff", "--on-port", str(port)]
        case SetMark(mark):
            return ["-j", "MARK", "--set-mark", str(mark)]
        case SaveMark():
            return ["-j", "CONNMARK", "--save-mark"]
        case RestoreMark():
            return ["-j", "CONNMARK", "--restore-mark"]
        case CtZone(zone):
            return ["-j", "CT", "--zone", str(zone)]
