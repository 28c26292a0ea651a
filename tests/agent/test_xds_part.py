"""The xDS part with Envoy: the saved copies serve, and the agent opens no stream of its own (its
subscriptions ride Envoy's streams through the xDS proxy)."""

from __future__ import annotations

from pathlib import Path

import trio
from envoy.config.core.v3.base_pb2 import Node

from pilotfish.agent.parts import XdsPart
from pilotfish.xds_client.nds import NameTableType
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.xds_client.saved import SavedCopy
from pilotfish.xds_client.transport import XdsClient, XdsSettings


def test_without_its_own_stream_it_serves_the_saved_copy_and_connects_nowhere(tmp_path: Path) -> None:
    saved = tmp_path / "nametable.pb"
    saved.write_bytes(b"table")
    nds = NameTableType(bytes)
    cache = ResourceCache()
    client = XdsClient(XdsSettings("127.0.0.1:1", "x", None, "/nonexistent", backoff_base=0.01), Node(id="n"),
                       cache, [SavedCopy(nds, str(saved))])

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(XdsPart(client, stream=False).serve)

    trio.run(main)  # the part returned once started: nothing left running
    served = cache.get(nds)
    assert served is not None and served.version == "saved" and served.value.built == b"table"
    assert (client.state.connects, client.state.failures, sum(client.state.terminations.values())) == (0, 0, 0)
