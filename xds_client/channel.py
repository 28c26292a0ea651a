"""The agent's one gRPC channel to the control plane, and the headers of every stream on it.

Shared by the agent's own ADS stream (transport.py) and the xDS proxy's upstream streams
(proxy.py), so that both speak to istiod as Istio's agent does (docs/istio-compat.md "ADS
stream to istiod"): TLS to the discovery address with the server name `istiod.istio-system.svc`
unless the address names another host (or ISTIOD_SAN says so), a `ClusterID` header,
`XDS_HEADER_*` headers, and `authorization: Bearer <token>` read from the token file for every
stream so a rotated projected token is picked up.

One channel per agent, not one per stream: a stream is an HTTP/2 stream on the connection the
channel keeps (grpc reconnects it by itself, at most RECONNECT_BACKOFF_MAX_MS apart while the
control plane is away). The root certificate file is looked at (one stat) whenever a stream
opens; when it changed, a new channel is made from it and the old one closed, which ends the
streams still on it: they reconnect over the new one (Istio rebuilds its dial options when the
root file changes).

With PROV_CERT (or FILE_MOUNTED_CERTS' client certificate) the connection also presents the
client certificate (clientcert.py), read when a channel is made; when the agent has renewed it
(its files changed), the next stream opens on a new channel with the new one, while the streams
on the old channel go on (Istio reads the files at each handshake: a renewal resets nothing).
The channel before that is closed at the next renewal, by when its streams have moved over.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.common.watch import Signature, file_signature

from .backoff import BACKOFF_BASE, BACKOFF_CAP
from .clientcert import client_certificate

log = logging.getLogger("pilotfish.xds")

SYSTEM_ROOTS = "SYSTEM"

# pilot-agent's keepalive on its connection to istiod (docs/istio-compat.md
# "ADS stream to istiod", "istiod: TLS and keepalive"): a ping after 30 s without traffic (GRPC_KEEPALIVE_INTERVAL), the
# connection given up when it is not answered within 10 s (GRPC_KEEPALIVE_TIMEOUT). istiod lets a
# client with a stream ping every 15 s (its EnforcementPolicy.MinTime) and closes the connection
# of one that pings faster (GOAWAY too_many_pings), so 30 s is twice the margin. Module values
# so that tests can shorten them.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# How long the shared channel waits at most between two attempts to reconnect while the control
# plane is away (grpc's default is 120 s): a stream opened meanwhile fails at once with
# UNAVAILABLE, so this bounds how late the agent notices that the control plane is back.
RECONNECT_BACKOFF_MAX_MS = 5_000


@dataclass(frozen=True)
class XdsSettings:
    """Where and how to connect."""

    address: str  # host:port
    server_name: str  # the name the server's certificate must carry
    root_cert: str | None  # PEM file, SYSTEM_ROOTS for the OS trust store, None for plaintext
    token_file: str  # re-read on every stream; missing or empty means no header
    cluster_id: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    backoff_base: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP
    delta: bool = False  # the agent's own stream: DeltaAggregatedResources instead of the state of the world
    client_key: str = ""  # with client_chain: the client certificate to present, if usable ("": none)
    client_chain: str = ""


def read_token(path: str) -> str:
    """The bearer token, trimmed; '' when the file cannot give one (common/tokens.py), so a bad
    token file costs a refused stream (and a retry) instead of the stream thread."""
    try:
        return read_token_file(path)
    except TokenFileError:
        return ""


def keepalive_options() -> list[tuple[str, int]]:
    """The channel arguments for the keepalive above."""
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),  # as grpc-go's default: no stream, no pings
        # grpc core stops keepalive pings after two without data in between (then one a minute);
        # grpc-go, pilot-agent's, has no such limit: an idle stream is checked every 30 s.
        ("grpc.http2.max_pings_without_data", 0),
    ]


class XdsChannel:
    """The channel to the control plane, made at the first stream; thread-safe."""

    def __init__(self, settings: XdsSettings) -> None:
        self.settings = settings
        self._channel: grpc.Channel | None = None
        self._retired: grpc.Channel | None = None  # the one before the client certificate's renewal
        self._root_seen: Signature | None = None
        self._client_seen: tuple[Signature | None, Signature | None] = (None, None)
        self._lock = threading.Lock()

    def metadata(self) -> list[tuple[str, str | bytes]]:
        """The headers of one stream, the token read now."""
        metadata: list[tuple[str, str | bytes]] = [("clusterid", self.settings.cluster_id)]
        for name, value in self.settings.headers:
            key = name.lower()
            # a binary header's value is bytes: the environment's own (os.environ decoded them
            # with surrogateescape), as Go's os.Getenv hands them to Istio's agent
            metadata.append((key, value.encode("utf-8", "surrogateescape") if key.endswith("-bin") else value))
        token = read_token(self.settings.token_file)
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        return metadata

    def stub(self) -> ads_pb2_grpc.AggregatedDiscoveryServiceStub:
        """An ADS stub on the channel, made anew when the root file or the client certificate's
        files changed since the last one. OSError when the root file cannot be read (the stream
        is not opened)."""
        with self._lock:
            root = self.settings.root_cert
            seen = file_signature(root) if root not in (None, SYSTEM_ROOTS) else None
            client = self._client_files()
            if self._channel is None or seen != self._root_seen or client != self._client_seen:
                channel = self._new_channel()  # raises before the old channel is given up
                if self._channel is not None and seen == self._root_seen:  # a renewal: streams go on
                    if self._retired is not None:
                        self._retired.close()
                    self._retired = self._channel
                elif self._channel is not None:
                    self._channel.close()
                self._channel, self._root_seen, self._client_seen = channel, seen, client
            return ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)

    def close(self) -> None:
        """Ends every stream on the channel; the next `stub` makes a new one."""
        with self._lock:
            for channel in (self._channel, self._retired):
                if channel is not None:
                    channel.close()
            self._channel = self._retired = None

    def _client_files(self) -> tuple[Signature | None, Signature | None]:
        key, chain = self.settings.client_key, self.settings.client_chain
        if not (key and chain):
            return None, None
        return file_signature(key), file_signature(chain)

    def _credentials(self) -> grpc.ChannelCredentials | None:
        root = self.settings.root_cert
        if root is None:
            return None
        client: tuple[bytes, bytes] | str = ""
        if self.settings.client_key and self.settings.client_chain:
            client = client_certificate(self.settings.client_key, self.settings.client_chain, datetime.now(UTC))
            if isinstance(client, str):
                log.info("xds: no client certificate for the control plane, the token only: %s", client)
        key, chain = client if isinstance(client, tuple) else (None, None)
        if root == SYSTEM_ROOTS:
            return grpc.ssl_channel_credentials(private_key=key, certificate_chain=chain)
        with open(root, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read(), private_key=key, certificate_chain=chain)

    def _new_channel(self) -> grpc.Channel:
        options: list[tuple[str, int | str]] = [
            *keepalive_options(),
            ("grpc.max_receive_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ]
        credentials = self._credentials()
        if credentials is None:
            return grpc.insecure_channel(self.settings.address, options=options)
        options.append(("grpc.ssl_target_name_override", self.settings.server_name))
        return grpc.secure_channel(self.settings.address, credentials, options=options)
