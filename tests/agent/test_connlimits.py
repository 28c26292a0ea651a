"""The status server's connection bounds, as decisions: per remote peer, for remote peers
together, a reserve for loopback peers, the oldest idle remote connection evicted first."""

from __future__ import annotations

import itertools
import logging

import pytest

from pilotfish.agent.connlimits import EVICTED, PEER_LIMIT, TOTAL_LIMIT, Admission, Admit, Limits, Refuse, peer_key
from pilotfish.common.ratelog import RateLimitedLog

ids = itertools.count


def test_one_remote_peer_holds_at_most_its_share() -> None:
    admission = Admission(Limits(per_peer=3, remote=10, local_reserve=2))
    n = ids()
    assert [admission.admit(next(n), "10.0.0.9", local=False) for _ in range(3)] == [Admit()] * 3
    assert admission.admit(next(n), "10.0.0.9", local=False) == Refuse(PEER_LIMIT)
    assert admission.admit(next(n), "10.0.0.7", local=False) == Admit()  # kubelet, another peer
    admission.closed(0)
    assert admission.admit(next(n), "10.0.0.9", local=False) == Admit()
    assert admission.dropped == {PEER_LIMIT: 1}


def test_a_busy_remote_crowd_cannot_take_the_local_reserve() -> None:
    admission = Admission(Limits(per_peer=2, remote=4, local_reserve=2))
    n = ids()
    for peer in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"):
        conn = next(n)
        assert admission.admit(conn, peer, local=False) == Admit()
        admission.started(conn)  # all being served: none can be evicted
    assert admission.admit(next(n), "10.0.0.3", local=False) == Refuse(TOTAL_LIMIT)
    assert admission.admit(next(n), "127.0.0.1", local=True) == Admit()
    assert admission.admit(next(n), "::1", local=True) == Admit()
    assert admission.open == 6
    assert admission.admit(next(n), "127.0.0.1", local=True) == Refuse(TOTAL_LIMIT)  # the hard total


def test_the_oldest_idle_remote_connection_makes_room() -> None:
    admission = Admission(Limits(per_peer=2, remote=4, local_reserve=1))
    n = ids()
    for peer in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"):
        admission.admit(next(n), peer, local=False)
    admission.started(0)  # 0 is being served; 1, 2, 3 sent nothing yet
    assert admission.admit(next(n), "10.0.0.7", local=False) == Admit(evict=1)
    assert admission.admit(next(n), "127.0.0.1", local=True) == Admit()  # the reserve
    assert admission.admit(next(n), "127.0.0.1", local=True) == Admit(evict=2)
    admission.closed(1)  # the evicted connection's own close later: ignored
    assert admission.dropped == {EVICTED: 2} and admission.open == 5


def test_loopback_peers_have_no_per_peer_limit_but_share_the_total() -> None:
    admission = Admission(Limits(per_peer=1, remote=2, local_reserve=1))
    n = ids()
    assert [admission.admit(next(n), "127.0.0.1", local=True) for _ in range(3)] == [Admit()] * 3
    assert admission.admit(next(n), "10.0.0.1", local=False) == Refuse(TOTAL_LIMIT)


@pytest.mark.parametrize("limits", [Limits(), Limits(per_peer=8, remote=64, local_reserve=16)])
def test_a_flood_from_one_address_leaves_room_for_everyone_else(limits: Limits) -> None:
    admission = Admission(limits)
    n = ids()
    kept = [c for c in (next(n) for _ in range(1100)) if admission.admit(c, "10.0.0.66", local=False) == Admit()]
    assert len(kept) == limits.per_peer and admission.dropped[PEER_LIMIT] == 1100 - limits.per_peer
    assert admission.admit(next(n), "10.0.0.1", local=False) == Admit()
    assert admission.admit(next(n), "127.0.0.1", local=True) == Admit()


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    warn = RateLimitedLog(logging.getLogger("pilotfish.test"), interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "pilotfish.test"):
        for _ in range(50):
            warn(logging.WARNING, "refused %s", "x")
        now[0] += 10
        warn(logging.WARNING, "refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == ["refused x", "refused y (49 similar suppressed)"]


def test_the_peer_holding_the_most_connections_pays_for_a_newcomer() -> None:
    """An honest client that is slow to send its head (the oldest idle connection) is not the one
    evicted: the flooder holding the most connections loses its oldest idle one."""
    admission = Admission(Limits(per_peer=8, remote=6, local_reserve=0))
    n = ids()
    assert admission.admit(next(n), "10.0.0.5", local=False) == Admit()  # 0: honest, slow
    for _ in range(4):
        admission.admit(next(n), "10.0.0.66", local=False)  # 1-4: the flooder
    admission.admit(next(n), "10.0.0.7", local=False)  # 5
    assert admission.admit(next(n), "10.0.0.66", local=False) == Admit(evict=1)
    assert admission.admit(next(n), "10.0.0.8", local=False) == Admit(evict=2)
    assert admission.admit(next(n), "10.0.0.9", local=False) == Admit(evict=3)  # 4 of 66 still the most
    # now 10.0.0.66 holds 2 (4 and 6), everyone else 1: the flooder still pays first
    assert admission.admit(next(n), "10.0.0.10", local=False) == Admit(evict=4)
    # every peer holds 1 connection: the oldest idle one goes, as before
    assert admission.admit(next(n), "10.0.0.11", local=False) == Admit(evict=0)


def test_busy_connections_count_but_are_never_evicted() -> None:
    admission = Admission(Limits(per_peer=8, remote=4, local_reserve=0))
    n = ids()
    admission.admit(next(n), "10.0.0.5", local=False)  # 0: idle, honest
    for _ in range(3):
        conn = next(n)
        admission.admit(conn, "10.0.0.66", local=False)
        admission.started(conn)  # 1-3: busy with a request each
    assert admission.admit(next(n), "10.0.0.66", local=False) == Admit(evict=0)  # the only idle one


@pytest.mark.parametrize("a,b,same", [
    ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", True),
    ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
    ("::ffff:10.0.0.1", "10.0.0.1", True),
    ("10.0.0.1", "10.0.0.2", False),
    ("fe80::1%eth0", "fe80::2%eth1", True),  # link-local: one network per link, zones aside
])
def test_peer_key(a: str, b: str, same: bool) -> None:
    assert (peer_key(a) == peer_key(b)) is same


def test_an_ipv6_64_is_one_peer() -> None:
    """A host with a /64 connecting from a new address each time meets the per-peer limit."""
    admission = Admission(Limits(per_peer=3, remote=64, local_reserve=0))
    n = ids()
    got = [admission.admit(next(n), f"2001:db8:1:2::{i:x}", local=False) for i in range(1, 6)]
    assert got == [Admit()] * 3 + [Refuse(PEER_LIMIT)] * 2
    assert admission.admit(next(n), "2001:db8:1:3::1", local=False) == Admit()
    admission.closed(0)
    assert admission.admit(next(n), "2001:db8:1:2::99", local=False) == Admit()
