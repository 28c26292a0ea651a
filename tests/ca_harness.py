"""The control plane's certificate service on a real TLS gRPC port, and the agent's identity and
SDS server running on trio in a thread beside it: what the identity tests drive."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import trio

from pilotfish.agent.identity.caclient import CaClient
from pilotfish.agent.identity.sds import SdsService, SecretStore, start_sds
from pilotfish.agent.identity.settings import identity_config
from pilotfish.agent.identity.workload import Identity
from pilotfish.controlplane.ca import (
    CertificateAuthority,
    cert_pem,
    issue_serving,
    key_pem,
    new_key,
    new_root,
    serving_names,
)
from pilotfish.controlplane.casvc import CertificateService
from pilotfish.controlplane.command import bind_listener
from pilotfish.controlplane.tlsfront import PeerCertificates, TlsFront, server_context
from pilotfish.xds_client.proto.istio.v1.auth.ca_pb2 import IstioCertificateRequest, IstioCertificateResponse
from pilotfish.xds_client.resources import ResourceCache

ID = "spiffe://cluster.local/ns/default/sa/productpage"


Tamper = Callable[[CertificateAuthority, IstioCertificateRequest, IstioCertificateResponse], IstioCertificateResponse]


class Ca:
    """istiod's CreateCertificate as `pilotfish controlplane` serves it (its TLS front, which asks
    for a client certificate without requiring one, before grpcio on a loopback port), for the
    token `good-token`; `tamper` may spoil what it answers (a CA that misbehaves), `down` makes
    it fail UNAVAILABLE (a CA that went away); `review` is the Kubernetes token review
    (controlplane/tokenreview.py) for the tokens it does not know."""

    def __init__(self, tmp: Path, max_ttl: timedelta, tamper: Tamper | None = None,
                 review: Callable[[str], str] | None = None) -> None:
        now = datetime.now(UTC)
        self.root = new_root(new_key(), now - timedelta(days=1))
        self.root_file = tmp / "root-cert.pem"
        self.root_file.write_bytes(cert_pem(self.root.cert))
        peers = PeerCertificates()
        self.service = CertificateService(self.root, lambda: {"good-token": ID}, max_ttl, peer_certificate=peers.lookup,
                                          review=review)
        self.down = False
        signed = self.service.create

        def create(request: IstioCertificateRequest, context: grpc.ServicerContext) -> IstioCertificateResponse:
            if self.down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the CA is down (test)")
            response = signed(request, context)
            return response if tamper is None else tamper(self.root, request, response)

        self.service.create = create  # type: ignore[method-assign]
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        backend = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        serving_key = new_key()
        context = server_context(key_pem(serving_key), cert_pem(issue_serving(self.root, serving_key, serving_names(), now)),
                                 cert_pem(self.root.cert))
        self.front = TlsFront(context, ("127.0.0.1", backend), peers)
        sock = bind_listener("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._serve, sock), daemon=True)
        self._thread.start()

    async def _serve(self, sock: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.front.serve, trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            await trio.to_thread.run_sync(self._cancel.wait)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._cancel.set()
        self._thread.join(timeout=10)
        self.server.stop(None)


def identity(tmp_path: Path, ca: Ca, token: str = "good-token", **env: str) -> Identity:
    token_file = tmp_path / "istio-token"
    token_file.write_text(token)
    environment = {"CA_ADDR": f"localhost:{ca.port}", "CA_ROOT_CA": str(ca.root_file),
                   "ECC_SIGNATURE_ALGORITHM": "ECDSA", **env}
    config = identity_config(environment, "default", "productpage", "istiod.istio-system.svc:15012",
                             "istiod.istio-system.svc")
    return Identity(config, CaClient(config, "Kubernetes", str(token_file)), ResourceCache())


class AgentSide:
    """The identity component on trio in a thread, and the SDS server on its socket."""

    def __init__(self, component: Identity, sds_socket: str) -> None:
        self.identity = component
        self.sds = SdsService(SecretStore(component.cache))
        server = start_sds(self.sds, sds_socket)
        assert server is not None
        self.server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.identity.serve)
            await trio.to_thread.run_sync(self._stop.wait)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.server.stop(None)


def write_mounted_certs(directory: Path) -> None:
    """A workload certificate in `directory` as Kubernetes would mount one (cert-chain.pem,
    key.pem, root-cert.pem): an agent finding them in ./etc/certs serves them instead of asking
    a CA."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from pilotfish.controlplane.ca import sign_leaf

    now = datetime.now(UTC)
    root = new_root(new_key(), now - timedelta(days=1))
    key = new_key()
    leaf = sign_leaf(root, key.public_key(), [x509.UniformResourceIdentifier(ID)],
                     [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], now, timedelta(days=1))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert-chain.pem").write_bytes(cert_pem(leaf) + cert_pem(root.cert))
    (directory / "key.pem").write_bytes(key_pem(key))
    (directory / "root-cert.pem").write_bytes(cert_pem(root.cert))
