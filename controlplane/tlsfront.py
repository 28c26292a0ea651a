"""TLS in front of the control plane's gRPC server, so that a client certificate may be given
and is then known (docs/identity.md "The control plane's CA").

istiod accepts a client certificate when one is given (an agent renewing over mTLS) and a
bearer token otherwise. grpcio's server can only refuse clients without a certificate or never
ask for one. So the control plane terminates TLS itself (Python's ssl: CERT_OPTIONAL against its
root, ALPN h2) and relays the bytes to its gRPC server on a loopback port; the relay's
connection to that port is registered with the client certificate, which the certificate
service finds by the peer address gRPC reports.

Bounds: MAX_CONNECTIONS relayed at once and MAX_PER_SOURCE from one address (the next is
closed at once: one unauthenticated address holding every slot locked every agent out, hostile
review), a handshake must finish within HANDSHAKE_TIMEOUT and the first bytes come within
FIRST_BYTES_TIMEOUT, each direction relays RELAY_CHUNK bytes at a time and reads again only once
they are sent (a client that never reads holds one chunk, not a queue).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading

import trio

log = logging.getLogger("pilotfish.controlplane")

MAX_CONNECTIONS = 2048  # the gRPC server's 1,000 streams at 8 a connection, twice over
MAX_PER_SOURCE = 64  # an agent needs two (ADS and a CA call): one address must not take them all
HANDSHAKE_TIMEOUT = 10.0
FIRST_BYTES_TIMEOUT = 5.0  # after the handshake a gRPC client sends its preface at once
RELAY_CHUNK = 64 * 1024


class PeerCertificates:
    """Client certificates by the relay's local port (thread-safe: gRPC's threads read it)."""

    def __init__(self) -> None:
        self._by_port: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def register(self, port: int, pem: bytes) -> None:
        with self._lock:
            self._by_port[port] = pem

    def drop(self, port: int) -> None:
        with self._lock:
            self._by_port.pop(port, None)

    def lookup(self, peer: str) -> bytes | None:
        """The client certificate of a gRPC peer (`ipv4:127.0.0.1:PORT`), if one was given."""
        kind, _, address = peer.partition(":")
        if kind != "ipv4" or not address.startswith("127.0.0.1:"):
            return None
        port = address.rpartition(":")[2]
        with self._lock:
            return self._by_port.get(int(port)) if port.isdigit() else None


def server_context(key_pem: bytes, cert_pem: bytes, root_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+, h2, a client certificate verified against `root_pem` when one is given."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="pilotfish-tls-") as directory:  # 0700: ssl reads files only
        path = os.path.join(directory, "serving.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(key_pem + cert_pem)
        context.load_cert_chain(path)
    context.load_verify_locations(cadata=root_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["h2"])
    return context


async def _relay(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    try:
        while data := await source.receive_some(RELAY_CHUNK):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


class TlsFront:
    """Accepts TLS on `listener` and relays each connection to the gRPC server at `backend`."""

    def __init__(self, context: ssl.SSLContext, backend: tuple[str, int], peers: PeerCertificates) -> None:
        self.context = context
        self.backend = backend
        self.peers = peers
        self.connections = 0
        self.by_source: dict[str, int] = {}
        self.refused = 0
        self.failed_handshakes = 0

    async def serve(self, listener: trio.SocketListener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                try:
                    source = str(stream.socket.getpeername()[0])
                except OSError:  # gone already
                    await trio.aclose_forcefully(stream)
                    continue
                if self.connections >= MAX_CONNECTIONS or self.by_source.get(source, 0) >= MAX_PER_SOURCE:
                    self.refused += 1
                    await trio.aclose_forcefully(stream)
                    continue
                self.connections += 1
                self.by_source[source] = self.by_source.get(source, 0) + 1
                nursery.start_soon(self._connection, stream, source)

    async def _connection(self, raw: trio.SocketStream, source: str) -> None:
        try:
            tls = trio.SSLStream(raw, self.context, server_side=True)
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, ssl.SSLError, OSError):
                    self.failed_handshakes += 1
                    return
            if timer.cancelled_caught:
                self.failed_handshakes += 1
                return
            der = tls.getpeercert(binary_form=True)
            first: bytes | bytearray = b""
            with trio.move_on_after(FIRST_BYTES_TIMEOUT):
                try:
                    first = await tls.receive_some(RELAY_CHUNK)
                except (trio.BrokenResourceError, ssl.SSLError, OSError):
                    return
            if not first:  # nothing within the timeout, or closed: no slot held for it
                return
            try:
                upstream = await trio.open_tcp_stream(*self.backend)
            except OSError as err:
                log.warning("controlplane: cannot reach its own gRPC server: %s", err)
                return
            port = upstream.socket.getsockname()[1]
            if der:
                self.peers.register(port, ssl.DER_cert_to_PEM_cert(der).encode())
            try:
                async with upstream, trio.open_nursery() as relays:
                    try:
                        await upstream.send_all(first)
                    except (trio.BrokenResourceError, OSError):
                        return
                    async def both_ways(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
                        await _relay(a, b)
                        relays.cancel_scope.cancel()  # one side ended: so does the other

                    relays.start_soon(both_ways, tls, upstream)
                    relays.start_soon(both_ways, upstream, tls)
            finally:
                self.peers.drop(port)
        finally:
            self.connections -= 1
            self.by_source[source] -= 1
            if not self.by_source[source]:
                del self.by_source[source]
            await trio.aclose_forcefully(raw)
