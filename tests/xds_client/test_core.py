"""The ADS core, state of the world and delta, driven by the same vectors: each step is the set
of resources the server holds after a change; the step is sent as a full response (state of the
world) or as the changes since the step before (delta), and both must give the same events and
serve the same values. The test plays the shell: it ACKs what was accepted, NACKs the rest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse, DiscoveryResponse, Resource
from google.protobuf.any_pb2 import Any
from google.protobuf.wrappers_pb2 import StringValue

from pilotfish.xds_client.core import Accepted, DeltaCore, Rejected, Request, SotwCore, TypeState
from pilotfish.xds_client.nds import TYPE_URL as NDS
from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable
from pilotfish.xds_client.resources import ResourceError, first_of_type

TEXT = "type.googleapis.com/google.protobuf.StringValue"  # a second type on the same stream
NODE = Node(id="sidecar~10.0.0.9~p.ns~ns.svc.cluster.local")


class Hosts:
    """Every host of every NameTable of the type, sorted: shows that a type sees the whole set."""

    type_url = NDS
    name = "name table"

    def decode(self, resources: Sequence[Any]) -> tuple[str, ...]:
        hosts: list[str] = []
        for resource in resources:
            table = NameTable.FromString(first_of_type([resource], NDS))
            if "raise.example" in table.table:
                raise KeyError("raise.example")  # not a ResourceError: any exception is a NACK
            if "refuse.example" in table.table:
                raise ResourceError("refuse.example is refused")
            hosts.extend(f"{host}={','.join(info.ips)}" for host, info in table.table.items())
        return tuple(sorted(hosts))

    def to_bytes(self, value: tuple[str, ...]) -> bytes:
        return "\n".join(value).encode()

    def from_bytes(self, data: bytes) -> tuple[str, ...]:
        return tuple(data.decode().split("\n"))


class Text:
    type_url = TEXT
    name = "text"

    def decode(self, resources: Sequence[Any]) -> str:
        return " ".join(StringValue.FromString(r.value).value for r in resources)

    def to_bytes(self, value: str) -> bytes:
        return value.encode()

    def from_bytes(self, data: bytes) -> str:
        return data.decode()


def nds(**hosts: str) -> Any:
    table = NameTable()
    for host, ip in hosts.items():
        table.table[host.replace("_", ".")].ips.append(ip)
    out = Any()
    out.Pack(table)
    return out


def text(value: str) -> Any:
    out = Any()
    out.Pack(StringValue(value=value))
    return out


GARBAGE = Any(type_url=NDS, value=b"\x0a\xff\xff\xff\xff\x0f")
WRONG = Any(type_url="type.googleapis.com/google.protobuf.Empty", value=b"")


@dataclass(frozen=True)
class Step:
    """The server's resources of `type_url` after a change, and what the client must make of it:
    the value served ("accepted"), a NACK whose message contains `want` ("rejected"), or
    nothing ("ignored")."""

    type_url: str
    resources: Mapping[str, Any]
    outcome: str
    want: object = None


VECTORS = {
    "first table": [Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted", ("a.example=10.0.0.1",))],
    "a change, then a second resource, then a removal": [
        Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted", ("a.example=10.0.0.1",)),
        Step(NDS, {"a": nds(a_example="10.0.0.2")}, "accepted", ("a.example=10.0.0.2",)),
        Step(NDS, {"a": nds(a_example="10.0.0.2"), "b": nds(b_example="10.0.0.3")}, "accepted",
             ("a.example=10.0.0.2", "b.example=10.0.0.3")),
        Step(NDS, {"b": nds(b_example="10.0.0.3")}, "accepted", ("b.example=10.0.0.3",)),
    ],
    "undecodable: rejected, then a good one is accepted": [
        Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted", ("a.example=10.0.0.1",)),
        Step(NDS, {"a": GARBAGE}, "rejected", "DecodeError"),
        Step(NDS, {"a": nds(a_example="10.0.0.4")}, "accepted", ("a.example=10.0.0.4",)),
    ],
    "a resource of another type inside": [Step(NDS, {"a": WRONG}, "rejected", "want 'type.googleapis.com/istio")],
    "any exception of a type is a NACK": [Step(NDS, {"a": nds(raise_example="10.0.0.1")}, "rejected",
                                               "KeyError: 'raise.example'")],
    "a type's own refusal in its own words": [Step(NDS, {"a": nds(refuse_example="10.0.0.1")}, "rejected",
                                                   "refuse.example is refused")],
    "nothing left of the type: ignored, the old value serves": [
        Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted", ("a.example=10.0.0.1",)),
        Step(NDS, {}, "ignored"),
        Step(NDS, {"b": nds(b_example="10.0.0.2")}, "accepted", ("b.example=10.0.0.2",)),
    ],
    "two types on one stream, each on its own": [
        Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted", ("a.example=10.0.0.1",)),
        Step(TEXT, {"x": text("hello"), "y": text("world")}, "accepted", "hello world"),
        Step(NDS, {"a": GARBAGE}, "rejected", "DecodeError"),
        Step(TEXT, {"y": text("world")}, "accepted", "world"),
    ],
    "a type not subscribed: ignored": [Step("type.googleapis.com/other", {"a": text("x")}, "ignored")],
}


class Server:
    """Encodes steps as the server would send them in either protocol."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.held: dict[str, dict[str, Any]] = {}
        self.count = 0

    def response(self, step: Step) -> DiscoveryResponse | DeltaDiscoveryResponse:
        self.count += 1
        version, nonce = f"v{self.count}", f"n{self.count}"
        before = self.held.get(step.type_url, {})
        self.held[step.type_url] = dict(step.resources)
        if not self.delta:
            return DiscoveryResponse(type_url=step.type_url, version_info=version, nonce=nonce,
                                     resources=[step.resources[name] for name in sorted(step.resources)])
        changed = [Resource(name=name, version=f"{name}-{self.count}", resource=value)
                   for name, value in sorted(step.resources.items()) if before.get(name) != value]
        removed = sorted(set(before) - set(step.resources))
        return DeltaDiscoveryResponse(type_url=step.type_url, system_version_info=version, nonce=nonce,
                                      resources=changed, removed_resources=removed)


def core(delta: bool, known: Mapping[str, TypeState] | None = None) -> SotwCore | DeltaCore:
    return (DeltaCore if delta else SotwCore)(NODE, [Hosts(), Text()], known or {})


def run(delta: bool, steps: list[Step]) -> tuple[SotwCore | DeltaCore, list[tuple[str, object]], list[Request]]:
    client, server = core(delta), Server(delta)
    client.initial_requests()
    served: dict[str, object] = {}
    outcomes: list[tuple[str, object]] = []
    sent: list[Request] = []
    for step in steps:
        event = client.on_response(server.response(step))  # type: ignore[arg-type]
        if event is None:
            outcomes.append(("ignored", served.get(step.type_url)))
        elif isinstance(event, Rejected):
            outcomes.append(("rejected", event.reason))
            sent.append(event.request)
        else:
            assert isinstance(event, Accepted)
            served[event.type_url] = event.value
            outcomes.append(("accepted", event.value))
            sent.append(client.ack(event))
    return client, outcomes, sent


@pytest.mark.parametrize("name", VECTORS)
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_vector(name: str, delta: bool) -> None:
    steps = VECTORS[name]
    _, outcomes, _ = run(delta, steps)
    previous: dict[str, object] = {}
    for step, (kind, got) in zip(steps, outcomes, strict=True):
        assert kind == step.outcome, (step, got)
        if kind == "accepted":
            assert got == step.want
            previous[step.type_url] = got
        elif kind == "rejected":
            assert isinstance(step.want, str) and step.want in str(got)
        else:
            assert got == previous.get(step.type_url)  # nothing changed


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_acks_and_nacks_echo_the_nonce_and_a_nack_keeps_the_version(delta: bool) -> None:
    client, _, sent = run(delta, VECTORS["undecodable: rejected, then a good one is accepted"])
    ack1, nack, ack2 = sent
    assert [r.response_nonce for r in sent] == ["n1", "n2", "n3"]
    assert not ack1.HasField("error_detail") and not ack2.HasField("error_detail")
    assert nack.error_detail.code == 13 and "DecodeError" in nack.error_detail.message
    assert not any(r.HasField("node") for r in sent)  # the node goes on the first request only
    if not delta:
        assert [r.version_info for r in sent] == ["v1", "v1", "v3"]
    state = client.states[NDS]
    assert (state.version, state.accepted, state.rejected, state.last_error) == ("v3", 2, 1, "")


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_initial_requests_subscribe_to_every_type_with_the_node_once(delta: bool) -> None:
    first, second = core(delta).initial_requests()
    assert (first.type_url, second.type_url) == (NDS, TEXT)
    assert first.node.id.startswith("sidecar~") and not second.HasField("node")
    assert not first.response_nonce


def test_a_new_sotw_stream_resumes_from_the_accepted_version_and_counts() -> None:
    client, _, _ = run(False, VECTORS["first table"])
    resumed = core(False, client.states)
    first = resumed.initial_requests()[0]
    assert first.version_info == "v1" and not first.response_nonce
    assert (resumed.states[NDS].accepted, resumed.states[NDS].nonce) == (1, "")


def test_a_new_delta_stream_says_which_resource_versions_it_holds() -> None:
    client, _, _ = run(True, VECTORS["a change, then a second resource, then a removal"])
    first = core(True, client.states).initial_requests()[0]
    assert dict(first.initial_resource_versions) == {"b": "b-3"}


def test_an_unacked_delta_change_is_not_kept() -> None:
    """A rejected delta leaves the set accepted last: the next change applies to that one."""
    client, server = core(True), Server(True)
    client.initial_requests()
    accepted = client.on_response(server.response(Step(NDS, {"a": nds(a_example="10.0.0.1")}, "accepted")))
    assert isinstance(accepted, Accepted)
    client.ack(accepted)
    rejected = client.on_response(server.response(Step(NDS, {"a": nds(a_example="10.0.0.1"), "b": GARBAGE}, "")))
    assert isinstance(rejected, Rejected)
    event = client.on_response(server.response(Step(NDS, {"a": nds(a_example="10.0.0.1"), "c": nds(c_x="1.1.1.1")}, "")))
    # the server removed b (never accepted) and added c: the set is a and c
    assert isinstance(event, Accepted) and event.value == ("a.example=10.0.0.1", "c.x=1.1.1.1")
