"""Requests per remote peer on the status port, as token buckets. Pure: the caller passes the
time and the peer's key (connlimits.peer_key: an IPv4 address or an IPv6 /64).

The connection bounds (connlimits.py) cap how many connections a peer holds, not how fast it
opens them: a peer that sends a complete request and reconnects at once stays under every
connection bound and still has the agent answer thousands of requests a second, each one time
the DNS proxy and the local probes do not get. So each remote peer also has a bucket of tokens:
`burst` at most, refilled at `rate` per second. Every connection takes one when it is accepted
(one with none left is closed at once, unread: a flood costs the loop an accept and a close),
and a request that renders (the metrics) takes `render_cost` more or is answered 429. Loopback
peers (Envoy's health listener, `pilot-agent request`, a local scraper) are not limited.

The figures and their reasons are in docs/agent.md ("Status server bounds").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

RATE = 20.0  # tokens per second per remote peer
BURST = 40.0  # tokens a peer that was quiet may spend at once
RENDER_COST = 4.0  # tokens a render (metrics) takes beyond the connection's one
MAX_PEERS = 4096  # buckets kept; past this, the least recently seen peer's is dropped


@dataclass(frozen=True)
class Rates:
    rate: float = RATE
    burst: float = BURST
    render_cost: float = RENDER_COST
    max_peers: int = MAX_PEERS


@dataclass
class _Bucket:
    tokens: float
    stamp: float  # when `tokens` was last brought up to date


class PeerRates:
    """One token bucket per remote peer, at most `max_peers` of them (least recently seen
    dropped first: a dropped peer starts again with a full bucket, which costs at most one
    burst; the memory stays bounded whatever the number of addresses)."""

    def __init__(self, rates: Rates = Rates()) -> None:
        self.rates = rates
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, peer: str, now: float) -> _Bucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(self.rates.burst, now)
            if len(self._buckets) > self.rates.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self.rates.burst, bucket.tokens + elapsed * self.rates.rate)
            bucket.stamp = now
        return bucket

    def pay(self, peer: str, cost: float, now: float) -> bool:
        """Take `cost` tokens from `peer`'s bucket if it holds them; False (nothing taken) if not."""
        bucket = self._bucket(peer, now)
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    @property
    def peers(self) -> int:
        """Buckets kept (at most `max_peers`)."""
        return len(self._buckets)
