"""The SDS server Envoy gets its certificates from: a unix socket, Envoy's SecretDiscoveryService
(docs/identity.md "SDS"). What a stream means is sdscore.py's; this is the gRPC shell.

Secrets: `default` (the workload's chain and key) and `ROOTCA` (its roots, with the CRL file when
there is one) from the workload certificate in the resource cache; `file-cert:<cert>~<key>` and
`file-root:<path>` from files, read when asked and pushed again when a file changes. A rotation
pushes `default`, and `ROOTCA` when the root changed, to the streams watching them. A stream that asks before the first
certificate is answered when it comes.

The socket is created 0600 in a directory made 0700 when we make it: whoever can connect gets
the workload's private key. A healthy socket already at the path (SPIRE's agent) is left alone
and the server does not start, as Istio does; a stale one (nothing listening) is replaced.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.extensions.transport_sockets.tls.v3.common_pb2 import CertificateValidationContext, TlsCertificate
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.any_pb2 import Any

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.watch import Signature, file_signature
from pilotfish.xds_client.inbox import CLOSED, open_inbox
from pilotfish.xds_client.pcds import MeshTrust, ProxyConfigType
from pilotfish.xds_client.resources import ResourceCache, Served
from pilotfish.xds_client.uds import listen_unix

from .issued import Issued
from .sdscore import SECRET_TYPE, SdsStream, StreamEnd
from .workload import WORKLOAD_CERTIFICATE

log = logging.getLogger("pilotfish.identity")

DEFAULT = "default"
ROOTCA = "ROOTCA"
SOCKET_DIR = "./var/run/secrets/workload-spiffe-uds"
SOCKET_NAME = "socket"
CRL_FILE = "./var/run/secrets/istio/crl/ca-crl.pem"
FILE_LIMIT = 1 << 20
MAX_STREAMS = 256  # Envoy opens one per secret name: a handful
FILE_POLL = 1.0  # seconds between looks at a stream's file secrets
FIRST_REQUEST = 10.0  # seconds a new stream has to send its first request (Envoy sends at once)
MAX_REQUEST_BYTES = 320 * 1024  # 64 names of 4 KiB and a node: grpc's default would be 4 MiB


class UnknownSecret(ValueError):
    """A name this server cannot serve; the stream that asked ends with NOT_FOUND."""


@dataclass(frozen=True)
class Changed:
    """Secrets that changed, posted to every stream's inbox."""

    names: tuple[str, ...]


def _file(path: str, name: str) -> bytes:
    try:
        return read_regular_file(path, FILE_LIMIT)
    except UnreadableFile as err:
        raise UnknownSecret(f"{name}: {path} {err}") from None


class SecretStore:
    """Secrets by name, built when asked (they are small, and asked for seldom)."""

    def __init__(self, cache: ResourceCache, crl_file: str = CRL_FILE, trust: ProxyConfigType | None = None) -> None:
        """`trust`: the PCDS type whose extra roots join the CA's in ROOTCA (PROXY_CONFIG_XDS_AGENT)."""
        self.cache = cache
        self.crl_file = crl_file
        self.trust = trust

    def secret(self, name: str) -> Secret | None:
        """The secret `name`, None while it does not exist yet; UnknownSecret."""
        if name in (DEFAULT, ROOTCA):
            served = self.cache.get(WORKLOAD_CERTIFICATE)
            if served is None:
                return None
            issued: Issued = served.value
            if name == DEFAULT:
                return _certificate(name, issued.chain_pem, issued.key_pem)
            return self._roots(name, self._with_mesh_roots(issued.root_pem))
        if name.startswith("file-cert:"):
            cert, sep, key = name[len("file-cert:"):].partition("~")
            if not sep or not cert or not key:
                raise UnknownSecret(f"{name}: want file-cert:<certificate path>~<key path>")
            return _certificate(name, _file(cert, name), _file(key, name))
        if name.startswith("file-root:"):
            return self._roots(name, _file(name[len("file-root:"):], name))
        raise UnknownSecret(f"unknown secret name {name!r}")

    def _with_mesh_roots(self, root: bytes) -> bytes:
        """The CA's root and the control plane's extra roots (PCDS), each once, the CA's first
        (Istio's UpdateConfigTrustBundle)."""
        served: Served[MeshTrust] | None = self.cache.get(self.trust) if self.trust is not None else None
        if served is None:
            return root
        pems = [root]
        for extra in served.value.ca_pems:
            data = extra.encode().strip() + b"\n"
            if data.strip() not in root:
                pems.append(data)
        return b"".join(p if p.endswith(b"\n") else p + b"\n" for p in pems)

    def _roots(self, name: str, pem: bytes) -> Secret:
        context = CertificateValidationContext(trusted_ca=DataSource(inline_bytes=pem))
        if os.path.isfile(self.crl_file):
            context.crl.CopyFrom(DataSource(filename=os.path.abspath(self.crl_file)))
        return Secret(name=name, validation_context=context)


def _check_roots(pems: tuple[str, ...]) -> None:
    """Each extra root must be PEM certificates (a bad one is NACKed, the old roots serve)."""
    from cryptography import x509

    for pem in pems:
        if not x509.load_pem_x509_certificates(pem.encode()):
            raise ValueError("no certificate in a caCertificatesPem entry")


def mesh_trust() -> ProxyConfigType:
    """The PCDS type the agent subscribes to and SecretStore reads (the same key)."""
    return ProxyConfigType(_check_roots)


def _certificate(name: str, chain: bytes, key: bytes) -> Secret:
    return Secret(name=name, tls_certificate=TlsCertificate(certificate_chain=DataSource(inline_bytes=chain),
                                                           private_key=DataSource(inline_bytes=key)))


class SdsService(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """The gRPC servicer: one SdsStream per stream, pushes from the resource cache."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store
        self._inboxes: set[queue.SimpleQueue[object]] = set()
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.pushes = 0
        self._root: bytes | None = None
        store.cache.watch(WORKLOAD_CERTIFICATE, self._rotated)
        if store.trust is not None:
            store.cache.watch(store.trust, self._trust_changed)

    def _rotated(self, issued: Issued) -> None:
        names = (DEFAULT,) if issued.root_pem == self._root else (DEFAULT, ROOTCA)
        self._root = issued.root_pem
        with self._lock:
            for inbox in self._inboxes:
                inbox.put(Changed(names))

    def _trust_changed(self, _trust: object) -> None:
        with self._lock:
            for inbox in self._inboxes:
                inbox.put(Changed((ROOTCA,)))

    def _response(self, names: Iterable[str]) -> DiscoveryResponse | None:
        resources = []
        for name in names:
            secret = self.store.secret(name)
            if secret is not None:
                packed = Any()
                packed.Pack(secret)
                resources.append(packed)
        if not resources:
            return None
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return DiscoveryResponse(type_url=SECRET_TYPE, version_info=f"{now}/{next(self._versions)}",
                                 nonce=str(uuid.uuid4()), resources=resources)

    def StreamSecrets(self, request_iterator: Iterator[DiscoveryRequest],
                      context: grpc.ServicerContext) -> Iterator[DiscoveryResponse]:
        inbox = open_inbox(request_iterator, context, "sds-requests", "sds: a stream")
        with self._lock:
            self._inboxes.add(inbox)
        stream = SdsStream()
        files = FileWatch()
        try:
            while (item := _next(inbox, files.polling(stream.watched) if stream.node_id else FIRST_REQUEST)) \
                    is not CLOSED:
                if item is None and not stream.node_id:  # a connection that holds a slot and asks nothing
                    log.warning("sds: closing a stream that sent no request within %.0f s", FIRST_REQUEST)
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no request")
                if item is None:  # a look at the files of the file secrets this stream watches
                    changed = files.changed(stream.watched)
                    if not changed:
                        continue
                    item = Changed(changed)
                try:
                    if isinstance(item, Changed):
                        names = stream.on_change(item.names)
                    else:
                        names = stream.on_request(item)  # type: ignore[arg-type]
                    response = self._response(names) if names else None
                except StreamEnd as end:
                    log.warning("sds: closing a stream (node %s): %s", stream.node_id or "unknown", end)
                    context.abort(getattr(grpc.StatusCode, end.code), str(end))
                except UnknownSecret as err:
                    log.warning("sds: node %s asked for a secret that cannot be served: %s", stream.node_id, err)
                    context.abort(grpc.StatusCode.NOT_FOUND, str(err))
                if response is not None:
                    files.sent(names, stream.watched)
                    stream.sent(response.nonce)
                    self.pushes += 1
                    log.info("sds: sent %s to %s (version %s)", ", ".join(names), stream.node_id, response.version_info)
                    yield response
        finally:
            with self._lock:
                self._inboxes.discard(inbox)

    def FetchSecrets(self, request: DiscoveryRequest, context: grpc.ServicerContext) -> DiscoveryResponse:
        try:
            names = SdsStream().on_request(request)
            response = self._response(names) if names else None
        except StreamEnd as end:
            context.abort(getattr(grpc.StatusCode, end.code), str(end))
        except UnknownSecret as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        if response is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no certificate yet")
        return response


def _file_paths(name: str) -> tuple[str, ...]:
    """The files a file secret is read from (none for the others)."""
    if name.startswith("file-cert:"):
        return tuple(name[len("file-cert:"):].partition("~")[::2])
    if name.startswith("file-root:"):
        return (name[len("file-root:"):],)
    return ()


class FileWatch:
    """The files of one stream's file secrets, as they were when last sent: looked at every
    FILE_POLL seconds while the stream watches any, a change pushes that secret again (a
    rotated Secret volume, a renewed certificate file). Per stream, on its own thread: nothing
    to start or stop."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Signature | None, ...]] = {}

    def polling(self, watched: Iterable[str]) -> float | None:
        return FILE_POLL if any(_file_paths(name) for name in watched) else None

    def sent(self, names: Iterable[str], watched: frozenset[str]) -> None:
        """After a response: the files of its file secrets as sent; names no longer watched are
        forgotten (a stream that renames its secrets must not grow this without bound)."""
        for name in list(self._seen):
            if name not in watched:
                del self._seen[name]
        for name in names:
            if _file_paths(name):
                self._seen[name] = tuple(file_signature(path) for path in _file_paths(name))

    def changed(self, watched: Iterable[str]) -> tuple[str, ...]:
        return tuple(name for name in sorted(watched) if name in self._seen and
                     self._seen[name] != tuple(file_signature(path) for path in _file_paths(name)))


def _next(inbox: queue.SimpleQueue[object], timeout: float | None) -> object:
    """The next item of the inbox, or None after `timeout` seconds without one."""
    try:
        return inbox.get(timeout=timeout)
    except queue.Empty:
        return None


def socket_path(env_name: str) -> str:
    """Where the socket is: WORKLOAD_IDENTITY_SOCKET_FILE names the file in Istio's directory."""
    return os.path.join(SOCKET_DIR, env_name or SOCKET_NAME)


def someone_listens(path: str) -> bool:
    """Whether a server already answers on the unix socket at `path` (SPIRE's agent, say)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def start_sds(service: SdsService, path: str) -> grpc.Server | None:
    """Listen on `path` and start; None when another server already answers there. OSError when
    the socket cannot be made."""
    if os.path.exists(path) and someone_listens(path):
        log.info("sds: a server already listens on %s (SPIRE?): Envoy uses it, this agent serves none", path)
        return None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=MAX_STREAMS + 4, thread_name_prefix="sds"),
                         maximum_concurrent_rpcs=MAX_STREAMS,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)
    listen_unix(server, path)  # a socket left by an earlier run is replaced
    server.start()
    log.info("sds: serving secrets on %s", path)
    return server
