"""A pushed resource until it serves, with the NameTable: built, swapped in, saved, then ACKed
(transport.settle); a table that raises anything is a NACK with its message that changes nothing
and saves nothing; a saved table that does not load is moved aside and the start goes on; the
temp files of interrupted saves are removed at start."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
from google.protobuf.any_pb2 import Any

from pilotfish.common import atomic as persist
from pilotfish.xds_client.core import Request, SotwCore
from pilotfish.xds_client.nds import TYPE_URL, BuiltTable, NameTableType
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import settle

POISON = "10.96.0.8\x00"  # inet_pton: ValueError, not OSError
Built = dict[str, list[str]]


def table(**hosts: str) -> NameTable:
    out = NameTable()
    for host, ip in hosts.items():
        out.table[f"{host}.ns1.svc.cluster.local"].ips.append(ip)
    return out


def packed(message: NameTable) -> Any:
    out = Any()
    out.Pack(message)
    return out


def build(serialized: bytes) -> Built:
    """Stands for DnsProxy.build_table: the real builder's inet_pton, or a raise."""
    built = {}
    for host, info in NameTable.FromString(serialized).table.items():
        for ip in info.ips:
            socket.inet_pton(socket.AF_INET, ip)
        built[host] = list(info.ips)
    return built


class Agent:
    """The shell's parts around one NDS subscription: what serves is what the watcher saw."""

    def __init__(self, path: Path, nds: NameTableType[Built] | None = None) -> None:
        self.nds = nds or NameTableType(build)
        self.cache = ResourceCache()
        self.serving: Built | None = None
        self.cache.watch(self.nds, self._serve)
        self.saved = SavedCopy(self.nds, str(path))
        self.core = SotwCore(Node(id="n"), [self.nds], {})
        self.core.initial_requests()

    def _serve(self, value: BuiltTable[Built]) -> None:
        self.serving = value.built

    def push(self, version: str, *resources: Any) -> Request:
        event = self.core.on_response(DiscoveryResponse(type_url=TYPE_URL, version_info=version,
                                                        nonce=f"n-{version}", resources=list(resources)))
        assert event is not None
        return settle(self.core, event, self.cache, self.saved)


def test_a_table_that_does_not_build_is_nacked_and_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "nametable.pb"
    agent = Agent(path)
    good = table(productpage="10.96.0.7")
    ack = agent.push("v1", packed(good))
    assert not ack.HasField("error_detail") and (ack.version_info, ack.response_nonce) == ("v1", "n-v1")
    saved = path.read_bytes()
    assert NameTable.FromString(saved) == good

    nack = agent.push("v2", packed(table(productpage="10.96.0.9", reviews=POISON)))
    assert nack.error_detail.code == 13 and nack.version_info == "v1" and nack.response_nonce == "n-v2"
    assert nack.error_detail.message == "cannot decode or build the NameTable: ValueError: embedded null character"
    assert agent.serving == {"productpage.ns1.svc.cluster.local": ["10.96.0.7"]}  # the old table serves
    served = agent.cache.get(agent.nds)
    assert served is not None and served.version == "v1" and served.value.message() == good
    assert path.read_bytes() == saved  # and stays the saved one
    state = agent.core.states[TYPE_URL]
    assert (state.rejected, state.accepted, state.version) == (1, 1, "v1")


@pytest.mark.parametrize("error", [MemoryError("table too large"), KeyError("x"), RecursionError("deep"),
                                   AssertionError("bug")])
def test_anything_a_table_raises_is_a_nack_with_its_message(tmp_path: Path, error: Exception) -> None:
    def broken(serialized: bytes) -> Built:
        raise error

    agent = Agent(tmp_path / "nametable.pb", NameTableType(broken))
    nack = agent.push("v1", packed(table(a="10.0.0.1")))
    assert nack.error_detail.message == f"cannot decode or build the NameTable: {type(error).__name__}: {error}"
    assert agent.serving is None and agent.cache.get(agent.nds) is None
    assert not (tmp_path / "nametable.pb").exists()


def test_swapped_in_then_saved_then_acked(tmp_path: Path) -> None:
    """The order of the shell: the value serves before it is saved, and is saved before the
    ACK records its version."""
    path = tmp_path / "nametable.pb"
    order: list[str] = []

    class Recording(NameTableType[Built]):
        def to_bytes(self, value: BuiltTable[Built]) -> bytes:
            order.append(f"saved while acked version is {agent.core.states[TYPE_URL].version!r}")
            return super().to_bytes(value)

    agent = Agent(path, Recording(build))
    agent.cache.watch(agent.nds, lambda value: order.append(f"swapped in, file exists: {path.exists()}"))
    ack = agent.push("v1", packed(table(a="10.0.0.1")))
    order.append(f"ack {ack.version_info}")
    assert order == ["swapped in, file exists: False", "saved while acked version is ''", "ack v1"]


def test_a_table_that_serves_but_cannot_be_saved_is_still_acked(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    agent = Agent(tmp_path / "file" / "nametable.pb")  # its directory is a file
    ack = agent.push("v1", packed(table(a="10.0.0.1")))
    assert not ack.HasField("error_detail") and agent.serving == {"a.ns1.svc.cluster.local": ["10.0.0.1"]}


def test_a_failing_watcher_does_not_stop_the_others(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "nametable.pb")
    seen: list[str] = []

    def broken(value: object) -> None:
        raise RuntimeError("watcher bug")

    agent.cache.watch(agent.nds, broken)
    agent.cache.watch(agent.nds, lambda value: seen.append("told"))
    assert not agent.push("v1", packed(table(a="10.0.0.1"))).HasField("error_detail")
    assert seen == ["told"] and agent.serving is not None


@pytest.mark.parametrize("data", [b"\x0a\x05\x0a\x03\xff\xfe", table(reviews=POISON).SerializeToString()],
                         ids=["undecodable", "poisoned"])
def test_a_saved_table_that_does_not_load_is_moved_aside(tmp_path: Path, data: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "nametable.pb"
    path.write_bytes(data)
    saved = SavedCopy(NameTableType(build), str(path))
    assert saved.load() is None
    assert not path.exists() and (tmp_path / "nametable.pb.bad").read_bytes() == data
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "nametable.pb.bad" in warnings[0].getMessage()
    assert "the saved name table" in warnings[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert saved.load() is None  # the next start: nothing saved, nothing to say
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_a_saved_table_that_loads_is_served(tmp_path: Path) -> None:
    path = tmp_path / "nametable.pb"
    path.write_bytes(table(a="10.0.0.1").SerializeToString())
    value = SavedCopy(NameTableType(build), str(path)).load()
    assert isinstance(value, BuiltTable) and value.built == {"a.ns1.svc.cluster.local": ["10.0.0.1"]}


def test_temp_files_of_interrupted_saves_are_removed_at_start(tmp_path: Path) -> None:
    """A save killed between its temp file and the rename (SIGKILL, OOM) leaves a full-size temp
    file; the next start removes ours and only ours."""
    path = tmp_path / "nametable.pb"
    path.write_bytes(table(a="10.0.0.1").SerializeToString())
    fd, left = tempfile.mkstemp(prefix=".nametable.pb.", dir=tmp_path)  # what write_atomic makes
    os.write(fd, b"half a table")
    os.close(fd)
    others = [tmp_path / ".other.pb.abcd1234", tmp_path / "nametable.pb.abcd1234", tmp_path / ".nametable.pb.toolongname"]
    for other in others:
        other.write_bytes(b"not ours")
    (tmp_path / ".nametable.pb.dir12345").mkdir()
    value = SavedCopy(NameTableType(build), str(path)).load()
    assert not os.path.exists(left)
    assert all(other.exists() for other in others) and (tmp_path / ".nametable.pb.dir12345").is_dir()
    assert isinstance(value, BuiltTable) and value.built == {"a.ns1.svc.cluster.local": ["10.0.0.1"]}


def test_saving_makes_every_missing_directory_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "nametable.pb"
    old = os.umask(0)
    try:
        persist.write_atomic(str(path), b"x")
    finally:
        os.umask(old)
    assert [(p.stat().st_mode & 0o777) for p in (tmp_path / "a", tmp_path / "a" / "b")] == [0o700, 0o700]
    assert path.stat().st_mode & 0o777 == 0o600
