"""The NameTable holder: a pushed table is built and swapped in before it is saved, a table that
does not build is a NACK that changes nothing, a saved table that does not load is moved aside,
and the temp files of interrupted saves are removed at start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any

from pilotfish.common import atomic as persist
from pilotfish.xds_client.nds import TYPE_URL, NameTableHolder
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.stream import AdsStream

POISON = "10.96.0.8\x00"  # inet_pton: ValueError, not OSError


def table(**hosts: str) -> NameTable:
    out = NameTable()
    for host, ip in hosts.items():
        out.table[f"{host}.ns1.svc.cluster.local"].ips.append(ip)
    return out


def packed(message: NameTable) -> Any:
    out = Any()
    out.Pack(message)
    return out


class Proxy:
    """Stands for DnsProxy.set_table: builds (the real builder's inet_pton) and swaps, or raises
    and keeps the table in use."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] | None = None

    def set_table(self, serialized: bytes) -> None:
        import socket

        message = NameTable.FromString(serialized)
        built = {}
        for host, info in message.table.items():
            for ip in info.ips:
                socket.inet_pton(socket.AF_INET, ip)
            built[host] = list(info.ips)
        self.table = built


def stream_for(holder: NameTableHolder) -> AdsStream:
    stream = AdsStream(Node(id="n"), {TYPE_URL: holder.on_response})
    stream.initial_requests()
    return stream


def test_a_table_that_does_not_build_is_nacked_and_nothing_changes(tmp_path: Path) -> None:
    cache = tmp_path / "nametable.pb"
    proxy = Proxy()
    holder = NameTableHolder(proxy.set_table, str(cache))
    stream = stream_for(holder)
    good = table(productpage="10.96.0.7")
    ack = stream.on_response(DiscoveryResponse(type_url=TYPE_URL, version_info="v1", nonce="n1", resources=[packed(good)]))
    assert ack is not None and not ack.HasField("error_detail")
    saved = cache.read_bytes()
    assert NameTable.FromString(saved) == good

    poisoned = table(productpage="10.96.0.9", reviews=POISON)
    nack = stream.on_response(DiscoveryResponse(type_url=TYPE_URL, version_info="v2", nonce="n2",
                                                resources=[packed(poisoned)]))
    assert nack is not None and nack.error_detail.code == 13 and nack.version_info == "v1"
    assert nack.error_detail.message == "cannot decode or build the NameTable: ValueError: embedded null character"
    assert proxy.table == {"productpage.ns1.svc.cluster.local": ["10.96.0.7"]}  # the old table serves
    assert cache.read_bytes() == saved  # and stays the saved one
    assert holder.version == "v1" and holder.table == good
    assert stream.types[TYPE_URL].rejected == 1 and stream.types[TYPE_URL].version == "v1"


def test_any_exception_of_a_handler_is_a_nack() -> None:
    def broken(version: str, resources: list[Any]) -> None:
        raise MemoryError("table too large")

    stream = AdsStream(Node(id="n"), {TYPE_URL: broken})
    stream.initial_requests()
    nack = stream.on_response(DiscoveryResponse(type_url=TYPE_URL, version_info="v1", nonce="n1",
                                                resources=[packed(table(a="10.0.0.1"))]))
    assert nack is not None and nack.error_detail.message == "MemoryError: table too large"


def test_the_table_is_saved_only_after_it_is_installed(tmp_path: Path) -> None:
    cache = tmp_path / "nametable.pb"
    order: list[str] = []

    def apply(serialized: bytes) -> None:
        order.append("installed" if not cache.exists() else "installed after the save")

    NameTableHolder(apply, str(cache)).on_response("v1", [packed(table(a="10.0.0.1"))])
    assert order == ["installed"] and cache.exists()


@pytest.mark.parametrize("data", [b"\x0a\x05\x0a\x03\xff\xfe", table(reviews=POISON).SerializeToString()],
                         ids=["undecodable", "poisoned"])
def test_a_saved_table_that_does_not_load_is_moved_aside(tmp_path: Path, data: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "nametable.pb"
    cache.write_bytes(data)
    proxy = Proxy()
    holder = NameTableHolder(proxy.set_table, str(cache))
    assert holder.load_cached() is False
    assert proxy.table is None and holder.table is None
    assert not cache.exists() and (tmp_path / "nametable.pb.bad").read_bytes() == data
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "nametable.pb.bad" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert holder.load_cached() is False  # the next start: nothing saved, nothing to say


def test_a_saved_table_that_loads_is_served(tmp_path: Path) -> None:
    cache = tmp_path / "nametable.pb"
    cache.write_bytes(table(a="10.0.0.1").SerializeToString())
    proxy = Proxy()
    assert NameTableHolder(proxy.set_table, str(cache)).load_cached() is True
    assert proxy.table == {"a.ns1.svc.cluster.local": ["10.0.0.1"]}


def test_temp_files_of_interrupted_saves_are_removed_at_start(tmp_path: Path) -> None:
    """A save killed between its temp file and the rename (SIGKILL, OOM) leaves a full-size temp
    file; the next start removes ours and only ours."""
    cache = tmp_path / "nametable.pb"
    cache.write_bytes(table(a="10.0.0.1").SerializeToString())
    fd, left = tempfile.mkstemp(prefix=".nametable.pb.", dir=tmp_path)  # what write_atomic makes
    os.write(fd, b"half a table")
    os.close(fd)
    others = [tmp_path / ".other.pb.abcd1234", tmp_path / "nametable.pb.abcd1234", tmp_path / ".nametable.pb.toolongname"]
    for other in others:
        other.write_bytes(b"not ours")
    (tmp_path / ".nametable.pb.dir12345").mkdir()
    proxy = Proxy()
    assert NameTableHolder(proxy.set_table, str(cache)).load_cached() is True
    assert not os.path.exists(left)
    assert all(other.exists() for other in others) and (tmp_path / ".nametable.pb.dir12345").is_dir()
    assert proxy.table == {"a.ns1.svc.cluster.local": ["10.0.0.1"]}


def test_saving_makes_every_missing_directory_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "nametable.pb"
    old = os.umask(0)
    try:
        persist.write_atomic(str(path), b"x")
    finally:
        os.umask(old)
    assert [(p.stat().st_mode & 0o777) for p in (tmp_path / "a", tmp_path / "a" / "b")] == [0o700, 0o700]
    assert path.stat().st_mode & 0o777 == 0o600
