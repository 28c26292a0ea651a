"""Which connections the status server keeps. Pure: peers in, decisions out; the server
(status.py) accepts, refuses and closes accordingly.

The status port listens on every interface (kubelet probes it from the node), so any peer on the
pod network can open connections to it. Each one costs the agent a file descriptor, and the DNS
proxy and the control-plane connection draw from the same table. So:

- one remote (non-loopback) peer holds at most `per_peer` connections, a peer being an IPv4
  address or an IPv6 /64 (`peer_key`: one host may use every address of its /64);
- remote peers together hold at most `remote`;
- `local_reserve` more are kept for loopback peers alone (Envoy's 15021 health listener, hooks
  such as `pilot-agent request`), so a remote flood never locks local probes out;
- when a slot is needed and none is free, a remote connection that is not being served yet (its
  request head has not arrived, or its render waits for a thread) is closed for the newcomer:
  the oldest such of the peer holding the most connections, so the flooder pays, not an honest
  client that happens to be slow (a hostile client costs itself); if every remote connection is
  being served, the newcomer is refused.

The figures and their reasons are in docs/agent.md ("Status server bounds").
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass

MAX_PER_PEER = 8
MAX_REMOTE = 64
LOCAL_RESERVE = 16

PEER_LIMIT = "peer_limit"
TOTAL_LIMIT = "total_limit"
EVICTED = "evicted"
HEADER_TIMEOUT = "header_timeout"
RATE_LIMIT = "rate_limit"
IPV6_PEER_PREFIX = 64  # the smallest network a host is normally given: it may use any address in it


def peer_key(peer: str) -> str:
    """The peer a remote address counts as: an IPv4 address itself (also written IPv4-mapped,
    `::ffff:10.0.0.1`), an IPv6 address its /64 (zone dropped). A host with a /64 (SLAAC privacy
    addresses, a VM, a delegated prefix) can connect from 2**64 addresses; keyed by the exact
    address, a per-peer limit would limit nobody who has one."""
    address = ipaddress.ip_address(peer.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PEER_PREFIX), strict=False))
    return str(address)


@dataclass(frozen=True)
class Limits:
    per_peer: int = MAX_PER_PEER
    remote: int = MAX_REMOTE
    local_reserve: int = LOCAL_RESERVE


@dataclass(frozen=True)
class Admit:
    """Keep the connection; first close `evict` (a connection id) if it is not None."""

    evict: int | None = None


@dataclass(frozen=True)
class Refuse:
    """Close the connection at once; `reason` is the metric label."""

    reason: str


@dataclass
class _Connection:
    peer: str  # peer_key of the address, for remote connections
    local: bool
    waiting: bool = True  # not being served yet (no request head, or a render waiting): may be evicted


class Admission:
    """The open connections of one status server, in arrival order, and what was dropped."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._open: dict[int, _Connection] = {}
        self._per_peer: Counter[str] = Counter()
        self._remote = 0
        self.dropped: Counter[str] = Counter()  # reason -> connections refused or closed early

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, conn: int, peer: str, local: bool, over_rate: bool = False) -> Admit | Refuse:
        """Decide about a new connection `conn` (an id unique among the open ones) from address
        `peer`; `over_rate`: the peer has spent its requests for now (ratelimit.py), so the
        connection is closed before it costs a read."""
        limits = self.limits
        if not local:
            if over_rate:
                return self._refuse(RATE_LIMIT)
            peer = peer_key(peer)
            if self._per_peer[peer] >= limits.per_peer:
                return self._refuse(PEER_LIMIT)
        full = self.open >= limits.remote + limits.local_reserve or (not local and self._remote >= limits.remote)
        evict = None
        if full:
            evict = self._victim()
            if evict is None:
                return self._refuse(TOTAL_LIMIT)
            self.closed(evict, EVICTED)
        self._open[conn] = _Connection(peer, local)
        if not local:
            self._remote += 1
            self._per_peer[peer] += 1
        return Admit(evict)

    def _victim(self) -> int | None:
        """The connection to close for a newcomer: of the remote peers with a connection not
        being served yet, the one holding the most connections (the earliest such connection
        breaks a tie); its oldest such connection. None when every remote connection is served."""
        oldest_waiting: dict[str, int] = {}
        for conn, info in self._open.items():  # arrival order
            if info.waiting and not info.local and info.peer not in oldest_waiting:
                oldest_waiting[info.peer] = conn
        if not oldest_waiting:
            return None
        return oldest_waiting[max(oldest_waiting, key=self._per_peer.__getitem__)]  # max keeps the first of equals

    def started(self, conn: int) -> None:
        """`conn` is being served (its answer is being made): it is no longer evicted."""
        info = self._open.get(conn)
        if info is not None:
            info.waiting = False

    def closed(self, conn: int, reason: str | None = None) -> None:
        """`conn` is gone (a second call for it is ignored); `reason` counts an early close."""
        info = self._open.pop(conn, None)
        if info is None:
            return
        if reason is not None:
            self.dropped[reason] += 1
        if not info.local:
            self._remote -= 1
            self._per_peer[info.peer] -= 1
            if not self._per_peer[info.peer]:
                del self._per_peer[info.peer]

    def _refuse(self, reason: str) -> Refuse:
        self.dropped[reason] += 1
        return Refuse(reason)
