"""Reading a serialized NameTable entry by entry (dns/tablewire.py): what protobuf decodes is what
it reads, what protobuf refuses it refuses (TableError), and nothing else escapes."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError
from vectors import distinct_tables, name_table

from pilotfish.dns.rebuild import build_beside, table_items
from pilotfish.dns.table import LookupTable, TableEntry, TableError
from pilotfish.dns.tablewire import name_table_entries
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def _messages() -> list[NameTable]:
    return [name_table(table) for table in distinct_tables()]


def _as_protobuf_reads_it(data: bytes) -> dict[str, TableEntry]:
    message = NameTable.FromString(data)
    return {host: TableEntry(tuple(i.ips), i.registry, i.shortname, i.namespace, tuple(i.alt_hosts))
            for host, i in message.table.items()}


def test_reads_what_protobuf_reads() -> None:
    for message in _messages():
        data = message.SerializeToString()
        assert dict(name_table_entries(data)) == _as_protobuf_reads_it(data)


def test_the_built_table_is_the_same_from_bytes() -> None:
    message = _messages()[0]
    from_bytes = build_beside(table_items(message.SerializeToString()), "ns1", "ns1.svc.cluster.local", SEARCH)
    assert from_bytes.names() == LookupTable.build(message.table, "ns1", "ns1.svc.cluster.local", SEARCH).names()


def _entry(key: bytes, value: bytes) -> bytes:
    body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(value)]) + value
    return b"\x0a" + bytes([len(body)]) + body


def test_unknown_fields_skipped_repeated_fields_merged() -> None:
    info = (b"\x0a\x0810.0.0.1" + b"\x12\x03Old" + b"\x12\x0aKubernetes"  # registry twice: the last
            + b"\x30\x96\x01" + b"\x39" + bytes(8) + b"\x45" + bytes(4) + b"\x4a\x02zz"  # unknown fields
            + b"\x0a\x0810.0.0.2")
    data = b"\x10\x01" + _entry(b"a.example", info) + b"\x1a\x00"
    assert list(name_table_entries(data)) == [
        ("a.example", TableEntry(("10.0.0.1", "10.0.0.2"), "Kubernetes", "", "", ()))]
    assert dict(name_table_entries(data)) == _as_protobuf_reads_it(data)


def test_every_truncation_is_refused_as_protobuf_refuses_it() -> None:
    data = _messages()[0].SerializeToString()
    for cut in range(len(data)):
        prefix = data[:cut]
        try:
            expect = _as_protobuf_reads_it(prefix)
        except DecodeError:
            with pytest.raises(TableError, match="^not a NameTable: truncated$"):
                list(name_table_entries(prefix))
        else:
            assert dict(name_table_entries(prefix)) == expect


def test_a_string_that_is_not_utf8_is_refused() -> None:
    data = _entry(b"a.\xffexample", b"")
    with pytest.raises(DecodeError):
        NameTable.FromString(data)
    with pytest.raises(TableError, match="not UTF-8"):
        list(name_table_entries(data))


def test_random_bytes_never_raise_anything_but_table_error() -> None:
    rng = random.Random(7)
    base = _messages()[0].SerializeToString()
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            list(name_table_entries(bytes(data)))
        except TableError:
            pass
