"""PCDS (PROXY_CONFIG_XDS_AGENT): the ProxyConfig's extra roots read from the wire form
(xds_client/pcds.py), NACKed when unusable, taken by the agent on Envoy's stream through the xDS
proxy, and served in ROOTCA beside the CA's root, pushed to the streams watching it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest
from fake_ads import Envoyish, FakeAds, response, start_fake, wait_for
from google.protobuf.any_pb2 import Any
from sds_client import NODE, NOW, ROOT, Client, issued, req, secrets

from pilotfish.agent.identity.sds import SdsService, SecretStore, mesh_trust, start_sds
from pilotfish.agent.identity.workload import WORKLOAD_CERTIFICATE
from pilotfish.controlplane.ca import cert_pem, new_key, new_root
from pilotfish.xds_client.channel import XdsChannel, XdsSettings
from pilotfish.xds_client.pcds import TYPE_URL, ca_certificates
from pilotfish.xds_client.proxy import LISTENER_TYPE, XdsProxy
from pilotfish.xds_client.resources import ResourceCache, ResourceError
from pilotfish.xds_client.saved import SavedCopy

pytestmark = pytest.mark.timeout(30)
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EXTRA = cert_pem(new_root(new_key(), NOW).cert).decode()


def field(number: int, wire: int, payload: bytes) -> bytes:
    key = number << 3 | wire
    out = bytearray()
    while True:
        byte, key = key & 0x7F, key >> 7
        out.append(byte | (0x80 if key else 0))
        if not key:
            break
    if wire == 2:
        out.append(len(payload)) if len(payload) < 128 else out.extend(bytes([len(payload) & 0x7F | 0x80,
                                                                              len(payload) >> 7]))
    return bytes(out) + payload


def proxy_config(*pems: str) -> bytes:
    """A ProxyConfig as istiod serializes one: other fields around the roots."""
    return (field(6, 2, b"istiod.istio-system.svc:15012") + field(11, 0, b"\x98\x75")
            + b"".join(field(34, 2, pem.encode()) for pem in pems) + field(26, 0, b"\xa4\x75"))


def test_the_roots_are_read_from_the_wire_form() -> None:
    assert ca_certificates(proxy_config(EXTRA, "second")) == (EXTRA, "second")
    assert ca_certificates(b"") == ()
    for bad in (proxy_config(EXTRA)[:-3], b"\x03", field(34, 2, b"x")[:-1]):
        with pytest.raises(ValueError):
            ca_certificates(bad)


def test_a_root_that_is_not_a_certificate_is_refused() -> None:
    trust = mesh_trust()
    assert trust.from_bytes(proxy_config(EXTRA)).ca_pems == (EXTRA,)
    with pytest.raises(ResourceError, match="caCertificatesPem"):
        trust.from_bytes(proxy_config("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, ResourceCache, object]]:
    cache, trust = ResourceCache(), mesh_trust()
    path = str(tmp_path / "uds" / "socket")
    server = start_sds(SdsService(SecretStore(cache, str(tmp_path / "no-crl.pem"), trust=trust)), path)
    assert server is not None
    client = Client(path)
    yield client, cache, trust
    client.close()
    server.stop(None)


def test_rootca_holds_the_extra_roots_and_is_pushed_when_they_change(
        served: tuple[Client, ResourceCache, object]) -> None:
    client, cache, trust = served
    cache.swap(WORKLOAD_CERTIFICATE.type_url, "cert-1", issued())
    client.send(req("ROOTCA", node=True))
    first = secrets(client.receive())["ROOTCA"].validation_context.trusted_ca.inline_bytes
    assert first == cert_pem(ROOT.cert)
    cache.swap(trust.type_url, "pc-1", trust.from_bytes(proxy_config(EXTRA, cert_pem(ROOT.cert).decode())))  # type: ignore[attr-defined]
    pushed = secrets(client.receive())["ROOTCA"].validation_context.trusted_ca.inline_bytes
    assert pushed == cert_pem(ROOT.cert) + EXTRA.encode()  # the CA's root first, each root once


def test_the_agent_takes_pcds_on_envoys_stream(tmp_path: Path) -> None:
    fake = FakeAds()
    server, address = start_fake(fake)
    cache, trust = ResourceCache(), mesh_trust()
    channel = XdsChannel(XdsSettings(address, "istiod.istio-system.svc", None, "/nonexistent"))
    proxy = XdsProxy(channel, cache, [SavedCopy(trust, "")], str(tmp_path / "XDS"))
    proxy.start()
    try:
        envoy = Envoyish(str(tmp_path / "XDS"), True)
        upstream = fake.next_stream()
        envoy.send(DeltaDiscoveryRequest(type_url=CDS, node=NODE))
        upstream.next_request()
        envoy.send(DeltaDiscoveryRequest(type_url=LISTENER_TYPE))
        upstream.next_request()
        subscription = upstream.next_request()
        assert subscription.type_url == TYPE_URL
        resource = Any(type_url=TYPE_URL, value=proxy_config(EXTRA))
        upstream.push(response(True, TYPE_URL, "v1", "n1", [("", resource)]))
        wait_for(lambda: cache.get(trust) is not None, "the ProxyConfig in the cache")
        assert cache.get(trust).value.ca_pems == (EXTRA,)  # type: ignore[union-attr]
        ack = upstream.next_request()
        assert ack.type_url == TYPE_URL and ack.response_nonce == "n1" and not ack.HasField("error_detail")
        envoy.close()
    finally:
        proxy.stop(0)
        channel.close()
        server.stop(0)

