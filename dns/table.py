"""The lookup table: a NameTable turned into what the answer engine needs.

Built once per NameTable, off the serving path, and never mutated afterwards (readers hold a
reference, a new table replaces the old one). Istio precomputes every alias *and* every
search-expanded CNAME name; at 10,000 services that is most of the build time. Here only the
aliases are stored. A search-expanded name (`<alias>.<search domain>.`) is recognised at lookup
time by stripping a search suffix, which costs one or two extra dict probes on a cache miss of
the answer memo and nothing at build time.

Behaviour follows reference/istio-dns-proxy.md §5–§6.2, with two deliberate changes:
- the search-domain fast path covers every search domain, not only the first (Istio answers
  `www.google.com.svc.cluster.local.` from upstream with NXDOMAIN after a round trip). The
  namespace-relative Kubernetes aliases (`name.`, `name.ns.`, `name.ns.svc.`) are expanded with
  the first search domain only, as in Istio: `productpage.svc.cluster.local.` is not a real
  Kubernetes name and keeps going upstream;
- an alias already under a search domain is not expanded with it (Istio's rule for the first
  domain since 62a70b1), except for the first domain when resolv.conf writes it with a trailing
  dot: Istio's suffix test then never matches and every alias is expanded with it, own-namespace
  FQDNs included (`productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.` is a CNAME to the
  FQDN). pilotfish does the same, as a client of Istio's proxy sees it; the other domains, which
  Istio never expands, keep the rule with or without the dot.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


class TableError(ValueError):
    """A NameTable that cannot be served: the message names the entry and the bad value.

    The whole table is refused (the agent NACKs it, `pilotfish dns` keeps the previous one), so
    one bad entry never leaves a half-built table or a crashed proxy behind.
    """


class NameInfo(Protocol):
    """What the table reads from a NameTable entry (the NDS proto's NameInfo has these)."""

    ips: Sequence[str]
    registry: str
    shortname: str
    namespace: str
    alt_hosts: Sequence[str]


class Addresses(NamedTuple):
    """The records of one name. `relative` marks a namespace-relative Kubernetes alias.

    A NamedTuple rather than a dataclass: one is made per entry and tuple construction is
    several times cheaper, which matters at 100,000 entries.
    """

    a: tuple[bytes, ...]  # 4-byte rdata, table order
    aaaa: tuple[bytes, ...]  # 16-byte rdata, table order
    relative: bool = False


class Match(NamedTuple):
    """Result of a lookup: the records, and the CNAME target when the name was expanded."""

    addresses: Addresses
    cname: str | None  # target alias (with trailing dot), or None for a direct answer


def proxy_domain_parts(namespace: str, domain: str) -> tuple[str, str]:
    """(PD, PD0) of §5.1: the proxy domain without a leading namespace label, and its first label."""
    if not domain:
        return "", ""
    labels = domain.split(".")
    if labels[0] == namespace:
        labels = labels[1:]
    pd = ".".join(labels)
    return pd, labels[0] if labels else ""


def aliases(
    host: str, info: NameInfo, namespace: str, pd: str, pd0: str
) -> list[tuple[str, bool]]:
    """The names an entry answers to, as (name with trailing dot, relative), not lower-cased.

    Istio's generateAltHosts: a Kubernetes key ending in '.' gives nothing; the short forms only
    exist when the hostname ends with the proxy domain (a plain string suffix test). An entry
    without shortname/namespace yields Istio's harmless `..` and `..svc.`, but never the root `.`
    (Istio would answer A queries for the root with the entry's IPs).
    """
    if info.registry != "Kubernetes":
        return [(host if host.endswith(".") else host + ".", False)]
    if host.endswith("."):
        return []
    out = [(host + ".", False)]
    if not pd or not host.endswith(pd):
        return out
    short, ns = info.shortname, info.namespace
    out.append((f"{short}.{ns}.", True))
    if ns == namespace and short:
        out.append((short + ".", True))
    out.append((f"{short}.{ns}.{pd0}.", True))
    for alt in info.alt_hosts:
        out.append((alt if alt.endswith(".") else alt + ".", False))
    return out


def parse_ips(ips: Iterable[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """Split IP literals into A and AAAA rdata; text that is not an IP literal (CIDRs, names) is
    dropped, as Istio does. IPv4-mapped IPv6 stays AAAA. A zone (`fe80::1%eth0`) is accepted and
    ignored. A string inet_pton cannot even look at (a NUL byte, a lone surrogate) raises
    ValueError: no NameTable istiod builds holds one, so it is a corrupt table, not an address to
    drop."""
    a: list[bytes] = []
    aaaa: list[bytes] = []
    for ip in ips:
        try:
            a.append(_inet_pton(_AF_INET, ip))
            continue
        except OSError:
            pass
        try:
            aaaa.append(_inet_pton(_AF_INET6, ip.partition("%")[0]))
        except OSError:
            pass
    return tuple(a), tuple(aaaa)


def _entry_fault(host: object, info: NameInfo, err: Exception) -> str:
    """What is wrong with one entry: the host, and the bad address when it is one."""
    for ip in getattr(info, "ips", None) or ():
        try:
            parse_ips((ip,))
        except (TypeError, ValueError):
            return f"entry {host!r}: bad IP {ip!r} ({err})"
    return f"entry {host!r}: {type(err).__name__}: {err}"


def _label_suffix(name: str, domain: str) -> bool:
    """Whether `name` (trailing dot) is `domain` or below it, label-aware."""
    return name == domain + "." or name.endswith("." + domain + ".")


class LookupTable:
    """Aliases → addresses, plus the search domains used to recognise expanded names."""

    __slots__ = ("names", "search", "entries", "_suffixes")

    def __init__(self, names: dict[str, Addresses], search: Sequence[str], entries: int) -> None:
        self.names = names
        self.entries = entries  # NameTable entries that produced at least one name
        written = [s for s in search if s.strip(".")]
        self.search = tuple(s.lower().strip(".") for s in written)
        dotted_first = bool(written) and written[0].endswith(".")
        # (suffix to strip, index, the domain an alias must not already be under, or None), with
        # the dots included; longest match handled by order.
        self._suffixes = tuple(
            ("." + s + ".", i, None if i == 0 and dotted_first else s) for i, s in enumerate(self.search)
        )

    @classmethod
    def build(
        cls,
        table: Mapping[str, NameInfo],
        namespace: str,
        domain: str,
        search: Sequence[str],
    ) -> LookupTable:
        """Build from a NameTable's `table` map (proto map or plain mapping of NameInfo-likes).

        Two entries that produce the same alias merge per address family, the later one winning,
        which is the outcome Istio reaches in one of its (random) map orders.
        """
        pd, pd0 = proxy_domain_parts(namespace, domain)
        names: dict[str, Addresses] = {}
        get = names.get
        used = 0
        for host, info in table.items():
            try:
                a, aaaa = parse_ips(info.ips)
                if not a and not aaaa:
                    continue
                produced = aliases(host, info, namespace, pd, pd0)
            except (TypeError, ValueError, AttributeError) as err:
                raise TableError(_entry_fault(host, info, err)) from None
            if produced:
                used += 1
            absolute = Addresses(a, aaaa, False)
            relative = None
            for alias, is_relative in produced:
                if is_relative:
                    relative = relative or Addresses(a, aaaa, True)
                    value = relative
                else:
                    value = absolute
                key = alias.lower()
                prev = get(key)
                if prev is not None:
                    value = Addresses(
                        value.a or prev.a, value.aaaa or prev.aaaa, value.relative and prev.relative
                    )
                names[key] = value
        return cls(names, search, used)

    def resolve(self, name: str) -> Match | None:
        """A known name, directly or as `<alias>.<search domain>.` (lower-case, trailing dot)."""
        found = self.names.get(name)
        if found is not None:
            return Match(found, None)
        for suffix, index, own in self._suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                alias = name[: len(name) - len(suffix) + 1]
                found = self.names.get(alias)
                if (
                    found is not None
                    and (index == 0 or not found.relative)
                    and (own is None or not _label_suffix(alias, own))
                ):
                    return Match(found, alias)
        return None

    def lookup(self, labels: Sequence[str]) -> Match | None:
        """Exact name first, then the nearest enclosing wildcard `*.<parent>.` (§6.2 step 3).

        `labels` are the lower-cased labels of the question name in presentation form.
        """
        match = self.resolve(".".join(labels) + ".")
        if match is not None:
            return match
        for i in range(1, len(labels)):
            match = self.resolve("*." + ".".join(labels[i:]) + ".")
            if match is not None:
                return match
        return None

    def expanded_names(self) -> dict[str, str]:
        """Every search-expanded name and its CNAME target (for tests and debugging only)."""
        out: dict[str, str] = {}
        for alias, addrs in self.names.items():
            for suffix, index, own in self._suffixes:
                if index and addrs.relative:
                    continue
                if own is not None and _label_suffix(alias, own):
                    continue
                name = alias + suffix[1:]
                if name not in self.names:
                    out.setdefault(name, alias)
        return out


def debug_view(
    table: Mapping[str, NameInfo], namespace: str, domain: str
) -> dict[str, dict[str, object]]:
    """Istio's /debug/ndsz body: the NameTable as proto JSON plus one key per generated alias that
    is not already a key (IPs v4 first then v6, canonical text, registry "Kubernetes")."""
    pd, pd0 = proxy_domain_parts(namespace, domain)
    out: dict[str, dict[str, object]] = {}
    for host, info in table.items():
        entry: dict[str, object] = {"ips": list(info.ips), "registry": info.registry}
        if info.shortname:
            entry["shortname"] = info.shortname
        if info.namespace:
            entry["namespace"] = info.namespace
        if info.alt_hosts:
            entry["altHosts"] = list(info.alt_hosts)
        out[host] = entry
    for host, info in table.items():
        a, aaaa = parse_ips(info.ips)
        ips = [str(ipaddress.ip_address(x)) for x in a + aaaa]
        for alias, _ in aliases(host, info, namespace, pd, pd0):
            if alias not in out:
                out[alias] = {"ips": ips, "registry": "Kubernetes"}
    return out
