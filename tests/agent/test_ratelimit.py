"""The status server's per-peer request rate, as decisions: token buckets with a burst, a
refill rate and a cost per request, bounded in number."""

from __future__ import annotations

from pilotfish.agent.ratelimit import PeerRates, Rates


def test_a_peer_spends_its_burst_then_its_rate() -> None:
    rates = PeerRates(Rates(rate=10, burst=20, render_cost=5))
    assert [rates.pay("10.0.0.9", 1, now=0.0) for _ in range(21)] == [True] * 20 + [False]
    assert not rates.pay("10.0.0.9", 1, now=0.05)  # half a token back
    assert rates.pay("10.0.0.9", 1, now=0.1)
    assert not rates.pay("10.0.0.9", 1, now=0.1)
    assert [rates.pay("10.0.0.9", 1, now=1.1) for _ in range(11)] == [True] * 10 + [False]  # 10 per second
    assert [rates.pay("10.0.0.9", 1, now=100.0) for _ in range(21)] == [True] * 20 + [False]  # never above the burst


def test_a_render_costs_more_and_a_refusal_takes_nothing() -> None:
    rates = PeerRates(Rates(rate=10, burst=20, render_cost=5))
    assert [rates.pay("p", 5, now=0.0) for _ in range(5)] == [True] * 4 + [False]
    assert not rates.pay("p", 6, now=0.5)  # 5 tokens back: a refused 6 takes none of them
    assert rates.pay("p", 5, now=0.5)
    assert not rates.pay("p", 1, now=0.5)


def test_peers_have_buckets_of_their_own() -> None:
    rates = PeerRates(Rates(rate=1, burst=2, render_cost=2))
    assert rates.pay("flooder", 2, now=0.0) and not rates.pay("flooder", 1, now=0.0)
    assert rates.pay("kubelet", 1, now=0.0) and rates.pay("prometheus", 2, now=0.0)


def test_the_number_of_buckets_is_bounded_least_recently_seen_first() -> None:
    rates = PeerRates(Rates(rate=1, burst=2, max_peers=3))
    for peer in ("a", "b", "c"):
        rates.pay(peer, 2, now=0.0)
    rates.pay("a", 0, now=0.0)  # a seen again: b is now the least recently seen
    rates.pay("d", 1, now=0.0)
    assert rates.peers == 3
    assert not rates.pay("a", 1, now=0.0) and not rates.pay("c", 1, now=0.0)  # kept, still empty
    assert rates.pay("b", 2, now=0.0)  # dropped: starts again with a full bucket (and evicts another)
    assert rates.peers == 3


def test_a_clock_that_steps_back_adds_nothing() -> None:
    rates = PeerRates(Rates(rate=10, burst=2))
    assert rates.pay("p", 2, now=5.0)
    assert not rates.pay("p", 1, now=4.0)
    assert rates.pay("p", 1, now=4.2)  # refill counts from the step back, never from before it

