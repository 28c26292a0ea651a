"""Building beside the serving threads (dns/rebuild.py): the same table as a build in one go, with
pauses that leave the GIL to other threads, and the replaced table freed piecemeal only when
nothing holds it any more."""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

from vectors import fixture_table, name_table

from pilotfish.dns.config import DnsConfig
from pilotfish.dns.rebuild import Pacer, build_beside, free_replaced, table_items
from pilotfish.dns.server import DnsProxy
from pilotfish.dns.table import LookupTable

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def _table(n: int = 0) -> LookupTable:
    entries = {f"svc-{i}.ns1.svc.cluster.local": SimpleNamespace(
        ips=[f"10.1.{i // 256}.{i % 256}"], registry="Kubernetes", shortname=f"svc-{i}", namespace="ns1", alt_hosts=())
        for i in range(n)}
    return LookupTable.build(entries, "ns1", "ns1.svc.cluster.local", SEARCH)


def test_build_beside_builds_what_build_builds() -> None:
    message = name_table(fixture_table("istio_test"))
    pauses = []
    paced = build_beside(table_items(message), "ns1", "ns1.svc.cluster.local", SEARCH, lambda: pauses.append(1))
    whole = LookupTable.build(message.table, "ns1", "ns1.svc.cluster.local", SEARCH)
    assert paced.names() == whole.names() and paced.expanded_names() == whole.expanded_names()
    assert pauses  # it offered to pause
    assert list(table_items(message.table)) == list(table_items(list(message.table.items())))


def test_pacer_sleeps_once_per_work_slice() -> None:
    now = [0.0]
    slept: list[float] = []
    pacer = Pacer(work=0.002, rest=0.001, clock=lambda: now[0], sleep=slept.append)
    for _ in range(10):
        now[0] += 0.0005
        pacer()
    assert slept == [0.001, 0.001]  # after 2 ms of work each time


def test_a_large_table_builds_no_garbage_collector_work() -> None:
    """Records are bytes, never tracked: building and holding a table adds nothing the cyclic
    collector must traverse (tuples made it run full collections of up to 0.35 s)."""
    gc.collect()
    before = len(gc.get_objects())
    table = _table(20_000)
    assert len(gc.get_objects()) - before < 200
    assert len(table) == 20_000 * 4


def test_replaced_table_is_emptied_when_nothing_holds_it() -> None:
    state = SimpleNamespace(table=_table(1000))
    shards = state.table._shards
    assert free_replaced(state, lambda: None) is True
    assert state.table is None and not any(shards)


def test_replaced_table_someone_holds_is_left_whole() -> None:
    state = SimpleNamespace(table=_table(1000))
    kept = state.table
    assert free_replaced(state, lambda: None) is False
    assert len(kept) == 4000 and kept.resolve("svc-1.ns1.svc.cluster.local.") is not None


def test_replaced_table_waits_for_its_last_reader() -> None:
    state = SimpleNamespace(table=_table(1000))
    shards = state.table._shards
    reading = threading.Event()
    done = threading.Event()

    def reader(held: SimpleNamespace) -> None:  # a serving thread that loaded the state
        reading.set()
        time.sleep(0.2)
        assert held.table.resolve("svc-1.ns1.svc.cluster.local.") is not None  # still whole
        done.set()

    thread = threading.Thread(target=reader, args=(state,))
    thread.start()
    reading.wait(5)
    assert free_replaced(state, lambda: None) is True
    thread.join(5)
    assert done.is_set() and not any(shards)


def test_set_table_frees_the_replaced_table() -> None:
    proxy = DnsProxy(DnsConfig(listen=(("127.0.0.1", 0),), search=SEARCH, proxy_namespace="ns1",
                               proxy_domain="ns1.svc.cluster.local"))
    try:
        proxy.set_table(name_table(fixture_table("istio_test")))
        shards = proxy.table._shards  # type: ignore[union-attr]
        assert any(shards)
        proxy.set_table(name_table(fixture_table("istio_test")))
        assert not any(shards) and proxy.table is not None and len(proxy.table)
    finally:
        proxy.close()
