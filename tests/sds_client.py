"""An SDS client for tests (one stream over the agent's unix socket, driven request by
request), a workload certificate from a test root, and the secrets of a response: shared by
tests/agent/test_sds.py and test_pcds.py."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.config.core.v3.base_pb2 import Node
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc.status_pb2 import Status

from pilotfish.agent.identity.issued import Issued
from pilotfish.agent.identity.sdscore import SECRET_TYPE
from pilotfish.controlplane.ca import CertificateAuthority, cert_pem, key_pem, new_key, new_root, sign_leaf

NODE = Node(id="sidecar~10.0.0.1~p.default~default.svc.cluster.local")


def req(*names: str, nonce: str = "", node: bool = False, error: bool = False) -> DiscoveryRequest:
    r = DiscoveryRequest(type_url=SECRET_TYPE, resource_names=list(names), response_nonce=nonce)
    if node:
        r.node.CopyFrom(NODE)
    if error:
        r.error_detail.CopyFrom(Status(code=13, message="bad secret"))
    return r


NOW = datetime.now(UTC)
ROOT = new_root(new_key(), NOW - timedelta(days=1))


def issued(root: CertificateAuthority = ROOT) -> Issued:
    key = new_key()
    leaf = sign_leaf(root, key.public_key(), [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/p")],
                     [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], NOW, timedelta(hours=1))
    return Issued(cert_pem(leaf) + cert_pem(root.cert), key_pem(key), cert_pem(root.cert), leaf.not_valid_after_utc,
                  NOW, leaf.serial_number)


class Client:
    """One SDS stream over the unix socket, driven request by request."""

    def __init__(self, path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.outbox: queue.SimpleQueue[DiscoveryRequest | None] = queue.SimpleQueue()
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()

        def requests() -> Iterator[DiscoveryRequest]:
            while (item := self.outbox.get()) is not None:
                yield item

        self.call = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel).StreamSecrets(requests())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.inbox.put(response)
        except grpc.RpcError as err:
            self.inbox.put(err)

    def send(self, request: DiscoveryRequest) -> None:
        self.outbox.put(request)

    def receive(self, timeout: float = 10.0) -> DiscoveryResponse:
        item = self.inbox.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item  # type: ignore[return-value]

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.inbox.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.outbox.put(None)
        self.channel.close()


def secrets(response: DiscoveryResponse) -> dict[str, Secret]:
    out = {}
    for packed in response.resources:
        secret = Secret()
        packed.Unpack(secret)
        out[secret.name] = secret
    return out
