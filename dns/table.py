"""The lookup table: a NameTable turned into what the answer engine needs.

Built once per NameTable, off the serving path, and never mutated afterwards (readers hold a
reference, a new table replaces the old one). Istio precomputes every alias *and* every
search-expanded CNAME name; at 10,000 services that is most of the build time. Here only the
aliases are stored. A search-expanded name (`<alias>.<search domain>.`) is recognised at lookup
time by stripping a search suffix, which costs one or two extra dict probes on a cache miss of
the answer memo and nothing at build time.

Shaped for tables of a million services built beside serving threads that share the GIL
(measured in bench/reload_bench.py, issue 7 item 19):
- each name's addresses are one `bytes` record, not a tuple of tuples: bytes are never tracked by
  the cyclic garbage collector, so building a table triggers no collections and a built table
  is never traversed by one (with tuples, full collections of up to 0.35 s ran during a
  500,000-service build, and every later full collection walked the table);
- the names are spread over 64 dicts by hash: a dict grows by copying itself in one C call that
  holds the GIL, 0.13 s for one dict of 2.8 million names, 64 times less per shard;
- `TableBuilder` adds one entry at a time, so the caller can pause between entries (the shell,
  dns/rebuild.py, does) and the serving threads get the GIL.

Behaviour follows Istio's (docs/istio-compat.md "DNS lookup table" and "DNS answers"), with two
deliberate changes:
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
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol

_inet_pton = socket.inet_pton
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6

SHARDS = 64  # dicts the names are spread over (a power of two)
_MASK = SHARDS - 1
# A record: relative flag (1 byte), number of A rdata (4 bytes), then the 4-byte A rdata and the
# 16-byte AAAA rdata, each in table order.
_HEAD = struct.Struct("!BI")
_HEAD_SIZE = _HEAD.size


class TableError(ValueError):
    """A NameTable that cannot be served: the message names the entry and the bad value.

    The whole table is refused (the agent NACKs it, `pilotfish dns` keeps the previous one), so
    one bad entry never leaves a half-built table or a crashed proxy behind.
    """


class NameInfo(Protocol):
    """What the table reads from a NameTable entry (the NDS proto's NameInfo has these, and so
    does TableEntry)."""

    @property
    def ips(self) -> Sequence[str]: ...
    @property
    def registry(self) -> str: ...
    @property
    def shortname(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def alt_hosts(self) -> Sequence[str]: ...


class TableEntry(NamedTuple):
    """A NameInfo read from a table file or from a NameTable's bytes."""

    ips: tuple[str, ...]
    registry: str
    shortname: str
    namespace: str
    alt_hosts: tuple[str, ...]


class Addresses(NamedTuple):
    """The records of one name, decoded. `relative` marks a namespace-relative Kubernetes alias."""

    a: tuple[bytes, ...]  # 4-byte rdata, table order
    aaaa: tuple[bytes, ...]  # 16-byte rdata, table order
    relative: bool = False


class Match(NamedTuple):
    """Result of a lookup: the records, and the CNAME target when the name was expanded."""

    a: tuple[bytes, ...]
    aaaa: tuple[bytes, ...]
    cname: str | None  # target alias (with trailing dot), or None for a direct answer


def _record(relative: bool, a: Sequence[bytes], aaaa: Sequence[bytes]) -> bytes:
    return _HEAD.pack(relative, len(a)) + b"".join(a) + b"".join(aaaa)


def _decode(record: bytes) -> Addresses:
    relative, n = _HEAD.unpack_from(record)
    end = _HEAD_SIZE + 4 * n
    a = tuple(record[i : i + 4] for i in range(_HEAD_SIZE, end, 4))
    aaaa = tuple(record[i : i + 16] for i in range(end, len(record), 16))
    return Addresses(a, aaaa, bool(relative))


def _match(record: bytes, cname: str | None) -> Match:
    addresses = _decode(record)
    return Match(addresses.a, addresses.aaaa, cname)


def _merge(new: bytes, old: bytes) -> bytes:
    """Two entries with one alias: per family the later one wins where it has addresses (Istio
    overwrites A and AAAA separately); relative only if both are."""
    n, o = _decode(new), _decode(old)
    return _record(n.relative and o.relative, n.a or o.a, n.aaaa or o.aaaa)


def proxy_domain_parts(namespace: str, domain: str) -> tuple[str, str]:
    """(PD, PD0): the proxy domain without a leading namespace label, and its first label
    (docs/istio-compat.md "DNS lookup table")."""
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


class TableBuilder:
    """Builds a LookupTable one NameTable entry at a time (`add`), then `finish` hands it over.

    Two entries that produce the same alias merge per address family, the later one winning,
    which is the outcome Istio reaches in one of its (random) map orders. An entry that cannot
    be served raises TableError; the builder is then abandoned and nothing was installed.
    """

    __slots__ = ("_namespace", "_pd", "_pd0", "_shards", "entries")

    def __init__(self, namespace: str, domain: str) -> None:
        self._namespace = namespace
        self._pd, self._pd0 = proxy_domain_parts(namespace, domain)
        self._shards: tuple[dict[str, bytes], ...] = tuple({} for _ in range(SHARDS))
        self.entries = 0  # entries that produced at least one name

    def add(self, host: str, info: NameInfo) -> None:
        try:
            a, aaaa = parse_ips(info.ips)
            if not a and not aaaa:
                return
            produced = aliases(host, info, self._namespace, self._pd, self._pd0)
        except (TypeError, ValueError, AttributeError) as err:
            raise TableError(_entry_fault(host, info, err)) from None
        if not produced:
            return
        self.entries += 1
        blob = b"".join(a) + b"".join(aaaa)
        absolute = _HEAD.pack(0, len(a)) + blob
        relative = None
        shards = self._shards
        for alias, is_relative in produced:
            if is_relative:
                value = relative = relative or _HEAD.pack(1, len(a)) + blob
            else:
                value = absolute
            key = alias.lower()
            shard = shards[hash(key) & _MASK]
            prev = shard.get(key)
            shard[key] = value if prev is None else _merge(value, prev)

    def finish(self, search: Sequence[str]) -> LookupTable:
        """The table (the builder must not be used afterwards: the table owns what it built)."""
        return LookupTable(self._shards, search, self.entries)


class LookupTable:
    """Aliases → addresses, plus the search domains used to recognise expanded names."""

    __slots__ = ("_shards", "_size", "_suffixes", "entries", "search")

    def __init__(self, shards: tuple[dict[str, bytes], ...], search: Sequence[str], entries: int) -> None:
        self._shards = shards
        self._size = sum(map(len, shards))
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
        """Build from a NameTable's `table` map (proto map or plain mapping of NameInfo-likes)
        in one go (see TableBuilder; dns/rebuild.py paces large builds)."""
        builder = TableBuilder(namespace, domain)
        add = builder.add
        for host, info in table.items():
            add(host, info)
        return builder.finish(search)

    def __len__(self) -> int:
        """How many names (aliases) the table answers directly."""
        return self._size

    def _get(self, name: str) -> bytes | None:
        return self._shards[hash(name) & _MASK].get(name)

    def resolve(self, name: str) -> Match | None:
        """A known name, directly or as `<alias>.<search domain>.` (lower-case, trailing dot)."""
        found = self._get(name)
        if found is not None:
            return _match(found, None)
        for suffix, index, own in self._suffixes:
            if name.endswith(suffix) and len(name) > len(suffix):
                alias = name[: len(name) - len(suffix) + 1]
                found = self._get(alias)
                if (
                    found is not None
                    and (index == 0 or not found[0])  # found[0]: the relative flag
                    and (own is None or not _label_suffix(alias, own))
                ):
                    return _match(found, alias)
        return None

    def lookup(self, labels: Sequence[str]) -> Match | None:
        """Exact name first, then the nearest enclosing wildcard `*.<parent>.` (docs/istio-compat.md
        "DNS answers").

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

    def same_answer(self, other: LookupTable, labels: Sequence[str]) -> bool:
        """Whether `other` answers a question for `labels` as this table does. Cheap when the
        name is a direct entry of both (the common case when a push changed little)."""
        name = ".".join(labels) + "."
        mine, theirs = self._get(name), other._get(name)
        if mine is not None and theirs is not None:
            return mine == theirs
        if (mine is None) != (theirs is None):
            return False
        return self.lookup(labels) == other.lookup(labels)

    def names(self) -> dict[str, Addresses]:
        """Every name the table answers directly, decoded (for tests and debugging: O(size))."""
        return {name: _decode(record) for shard in self._shards for name, record in shard.items()}

    def expanded_names(self) -> dict[str, str]:
        """Every search-expanded name and its CNAME target (for tests and debugging only)."""
        out: dict[str, str] = {}
        for shard in self._shards:
            for alias, record in shard.items():
                for suffix, index, own in self._suffixes:
                    if index and record[0]:
                        continue
                    if own is not None and _label_suffix(alias, own):
                        continue
                    name = alias + suffix[1:]
                    if self._get(name) is None:
                        out.setdefault(name, alias)
        return out

    def release(self) -> Iterator[None]:
        """Empty the table one shard at a time, yielding after each: for its last holder, to free
        a large table in pieces (freed at once, 1,000,000 services hold the GIL for ~0.2 s)."""
        for shard in self._shards:
            shard.clear()
            self._size = sum(map(len, self._shards))
            yield


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
