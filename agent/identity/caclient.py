"""The CA client: one CreateCertificate call to istiod's certificate service (or the project's
control plane), over TLS, as Istio's agent makes it (docs/identity.md "The CA call").

A new channel for every call, so that a rotated root file, token or client certificate is used
at once (Istio rebuilds its connection after a failed call; a certificate is asked for twice a
day). Headers: `ClusterID`, `CA_HEADER_*`, and `authorization: Bearer <token>` read from the
token file at every call. A client certificate is presented when one is given: PROV_CERT's, or,
beyond Istio, the current one when the token cannot authenticate (identity/renewal.py). Within
one call, up to five attempts on the codes Istio retries, 100 ms apart and doubling, ±10%.
Blocking: it runs in a worker thread.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import grpc
from google.protobuf.struct_pb2 import Struct

from pilotfish.common.tokens import TokenFileError, read_token_file
from pilotfish.xds_client.proto.istio.v1.auth.ca_pb2 import IstioCertificateRequest, IstioCertificateResponse

from .settings import SYSTEM, IdentityConfig

log = logging.getLogger("pilotfish.identity")

METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
ATTEMPTS = 5
FIRST_RETRY = 0.1
RETRIED = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})
CALL_TIMEOUT = 30.0


class CaCallError(Exception):
    """The CA gave no certificate; the message says why (the status, or what was unreadable)."""


@dataclass(frozen=True)
class ClientCertificate:
    key_pem: bytes
    chain_pem: bytes
    why: str  # for the log: "PROV_CERT" or "the current certificate"


class CaClient:
    def __init__(self, config: IdentityConfig, cluster_id: str, token_file: str) -> None:
        self.config = config
        self.cluster_id = cluster_id
        self.token_file = token_file
        self.retries = 0  # istio_agent_num_outgoing_retries

    def token(self) -> str:
        """The bearer token now ('' when the file gives none)."""
        try:
            return read_token_file(self.token_file)
        except TokenFileError:
            return ""

    def _credentials(self, client: ClientCertificate | None) -> grpc.ChannelCredentials:
        root = self.config.ca_root
        roots = None
        if root is not None and root != SYSTEM:
            try:
                with open(root, "rb") as f:
                    roots = f.read()
            except OSError as err:
                raise CaCallError(f"cannot read the CA root {root}: {err.strerror or err}") from None
        if client is None:
            return grpc.ssl_channel_credentials(roots)
        return grpc.ssl_channel_credentials(roots, client.key_pem, client.chain_pem)

    def _channel(self, client: ClientCertificate | None) -> grpc.Channel:
        if self.config.ca_root is None:
            return grpc.insecure_channel(self.config.ca_address)
        return grpc.secure_channel(self.config.ca_address, self._credentials(client),
                                   options=[("grpc.ssl_target_name_override", self.config.ca_server_name)])

    def _metadata(self, token: str) -> list[tuple[str, str]]:
        metadata = [("clusterid", self.cluster_id)] + [(name.lower(), value) for name, value in self.config.ca_headers]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        return metadata

    def request(self, csr_pem: bytes) -> IstioCertificateRequest:
        metadata = Struct()
        metadata.update({"CertSigner": self.config.cert_signer})
        return IstioCertificateRequest(csr=csr_pem.decode(), validity_duration=self.config.ttl_seconds,
                                       metadata=metadata)

    def sign(self, csr_pem: bytes, client: ClientCertificate | None, token: str) -> list[str]:
        """The cert_chain for `csr_pem`, or CaCallError."""
        request = self.request(csr_pem)
        with self._channel(client) as channel:
            create = channel.unary_unary(METHOD, request_serializer=IstioCertificateRequest.SerializeToString,
                                         response_deserializer=IstioCertificateResponse.FromString)
            attempt, delay = 1, FIRST_RETRY
            while True:
                try:
                    return list(create(request, metadata=self._metadata(token), timeout=CALL_TIMEOUT).cert_chain)
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()  # type: ignore[attr-defined]
                    if code not in RETRIED or attempt == ATTEMPTS:
                        raise CaCallError(f"{code.name}: {details}") from None
                self.retries += 1
                attempt += 1
                time.sleep(delay * random.uniform(0.9, 1.1))  # a retry's backoff, not a wait for state
                delay *= 2
