"""Keepalive between the agent's xDS client and the control plane, over real gRPC and TLS, with
both sides' periods shortened by the same factor: an idle stream stays up, as between
pilot-agent and istiod, and a client pinging faster than the policy is told too_many_pings."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import trio
from envoy.config.core.v3.base_pb2 import Node
from pilotfish.controlplane.ads import (
    ISTIOD_KEEPALIVE,
    AdsServicer,
    Keepalive,
    MeshHub,
    start_server,
)
from pilotfish.controlplane.ca import (
    cert_pem,
    issue_serving,
    key_pem,
    new_key,
    new_root,
    serving_names,
)
from pilotfish.xds_client import channel
from pilotfish.xds_client.nds import NameTableType
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import XdsClient, XdsSettings
from streams import snapshot

# grpc core sends a client's pings at least 1 s apart, whatever its keepalive time: the agent's
# 30 s becomes 1 s here, and istiod's figures are divided by the same factor.
SCALE = channel.KEEPALIVE_TIME_MS // 1000
PERIOD = channel.KEEPALIVE_TIME_MS / SCALE / 1000  # the agent's ping period in the test, seconds
# A policy breach ends the stream at the 4th ping (the first is never a strike; GOAWAY comes
# with the third strike); the idle stream is watched for one more.
IDLE_PERIODS = 5


def scaled(policy: Keepalive) -> Keepalive:
    """`policy` with its periods divided by SCALE; the timeout stays long enough for a loaded
    machine (it is not what is tested)."""
    return replace(policy, time_ms=policy.time_ms // SCALE, min_ping_interval_ms=policy.min_ping_interval_ms // SCALE)


@dataclass
class Link:
    """A control plane serving one table, and the agent's client to dial it."""

    servicer: AdsServicer
    client: XdsClient


@pytest.fixture
def link(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Link]:
    monkeypatch.setattr(channel, "KEEPALIVE_TIME_MS", channel.KEEPALIVE_TIME_MS // SCALE)
    now = datetime.now(UTC)
    ca = new_root(new_key(), now)
    key = new_key()
    credentials = grpc.ssl_server_credentials([(key_pem(key), cert_pem(issue_serving(ca, key, serving_names(), now)))])
    root = tmp_path / "root-cert.pem"
    root.write_bytes(cert_pem(ca.cert))
    servicer = AdsServicer(MeshHub(snapshot("v1")))
    server, port = start_server(servicer, "127.0.0.1:0", credentials, keepalive=request.param)
    settings = XdsSettings(address=f"127.0.0.1:{port}", server_name="istiod.istio-system.svc",
                           root_cert=str(root), token_file=str(tmp_path / "no-token"))
    node = Node(id="sidecar~10.1.1.5~app.default~default.svc.cluster.local")
    yield Link(servicer, XdsClient(settings, node, ResourceCache(), [SavedCopy(NameTableType(bytes), "")]))
    server.stop(grace=None).wait()


async def idle(client: XdsClient, seconds: float, until_failure: bool = False) -> None:
    """Run the client until it has a table, then leave its stream idle for `seconds` (or until
    it ends with an error, with `until_failure`)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(10):
            while not (client.state.connected and client.state.last_update):
                await trio.sleep(0.02)
        if until_failure:
            with trio.move_on_after(seconds):
                while not client.state.last_error:
                    await trio.sleep(0.02)
        else:
            await trio.sleep(seconds)  # the time that passes is what is tested: pings, no traffic
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("link", [scaled(ISTIOD_KEEPALIVE)], indirect=True, ids=["istiod-policy"])
def test_an_idle_stream_stays_up_across_keepalive_periods(link: Link) -> None:
    """The agent's keepalive against istiod's policy, both scaled: no GOAWAY, no reconnect."""
    trio.run(idle, link.client, IDLE_PERIODS * PERIOD + PERIOD / 2)
    assert (link.client.state.connects, link.client.state.failures, link.servicer.counters.streams) == (1, 0, 1), \
        link.client.state.last_error


@pytest.mark.parametrize("link", [replace(scaled(ISTIOD_KEEPALIVE), min_ping_interval_ms=int(3000 * PERIOD))],
                         indirect=True, ids=["policy-3-periods"])
def test_a_client_pinging_faster_than_the_policy_is_told_too_many_pings(link: Link) -> None:
    """The same client against a policy asking for 3 periods between pings: the policy is real,
    and so are the idle stream's pings in the test above."""
    trio.run(idle, link.client, 4 * IDLE_PERIODS * PERIOD, True)
    assert link.client.state.last_error == "UNAVAILABLE: Too many pings"
