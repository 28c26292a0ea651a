"""The xDS proxy's outbox: Envoy's requests bounded (a put waits for room), the agent's never
waiting and at most one per type, all in the order they came."""

from __future__ import annotations

import threading

from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from pilotfish.xds_client.outbox import Outbox


def req(type_url: str, nonce: str = "", size: int = 0) -> DiscoveryRequest:
    return DiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names=["x" * size] if size else [])


def test_order_and_the_agents_requests_replace_their_own_kind() -> None:
    outbox = Outbox()
    assert outbox.forward(req("cds"))
    outbox.own(req("nds", "1"))
    assert outbox.forward(req("lds"))
    outbox.own(req("nds", "2"))  # replaces the waiting ACK of nonce 1, in its place
    outbox.own(req("health"))
    got = iter(outbox)
    assert [(r.type_url, r.response_nonce) for r in (next(got) for _ in range(4))] == [
        ("cds", ""), ("nds", "2"), ("lds", ""), ("health", "")]
    outbox.own(req("nds", "3"))  # nothing of its kind waits any more: queued
    assert next(got).response_nonce == "3"


def test_envoys_requests_wait_for_room_and_the_agents_do_not() -> None:
    outbox = Outbox(limit=2, limit_bytes=1000)
    assert outbox.forward(req("a")) and outbox.forward(req("b"))
    done = threading.Event()
    third = threading.Thread(target=lambda: (outbox.forward(req("c")), done.set()))
    third.start()
    outbox.own(req("nds"))  # never waits
    assert not done.wait(0.2)  # held: two wait already
    got = iter(outbox)
    assert next(got).type_url == "a"
    assert done.wait(5)
    assert [next(got).type_url for _ in range(3)] == ["b", "nds", "c"]
    third.join()


def test_bytes_bound_too_but_one_request_always_passes() -> None:
    outbox = Outbox(limit=100, limit_bytes=1000)
    assert outbox.forward(req("big", size=5000))  # alone: allowed whatever its size
    closer = threading.Timer(0.2, outbox.close)
    closer.start()
    assert not outbox.forward(req("small", size=10))  # waited for room, then the outbox closed
    assert list(outbox) == []
    closer.join()
