"""The control plane's certificate service: istiod's `CreateCertificate`, signed by its root.

Identity comes from authentication, never from the CSR (docs/controlplane.md "Workload
certificates"): a bearer token listed in the identities file, or one the Kubernetes API server
vouches for (`--token-review`, controlplane/tokenreview.py, as istiod does), or, on renewal, the SPIFFE ID of a client certificate this CA issued and that
is still valid. A CSR that asks for another identity is refused with PERMISSION_DENIED (istiod
ignores the CSR's SAN and signs for the caller; saying no makes a misconfigured agent visible).
The lifetime asked for is capped by `max_ttl`.

`decide` is pure (a request and who the caller is in, the certificate chain or a refusal out);
`CertificateService` is the gRPC shell, bound by method name (the messages are generated,
xds_client/proto/istio/v1/auth/ca.proto; the stubs are not).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.ratelog import RateLimitedLog
from pilotfish.common.watch import file_signature
from pilotfish.xds_client.proto.istio.v1.auth.ca_pb2 import IstioCertificateRequest, IstioCertificateResponse

from .ca import CertificateAuthority, cert_pem, sign_leaf
from .tokenreview import ReviewFailed, bearer_token

log = logging.getLogger("pilotfish.controlplane")

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
DEFAULT_TTL = timedelta(hours=24)  # istiod's default workload certificate TTL
MAX_CSR_BYTES = 64 * 1024  # an RSA 4096 CSR is ~1.7 KiB
IDENTITIES_LIMIT = 1 << 20
WORKLOAD_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


class Refused(Exception):
    """A request that gets no certificate: the gRPC status and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Caller:
    """Who the caller authenticated as, and how (for the logs)."""

    identity: str  # spiffe://...
    via: str  # "token" or "client certificate"


def spiffe(trust_domain: str, namespace_sa: str) -> str:
    namespace, _, account = namespace_sa.partition("/")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


def parse_identities(text: str, trust_domain: str) -> dict[str, str]:
    """`<token> <namespace>/<serviceaccount>` per line (`#` comments, blank lines) to token ->
    SPIFFE ID; ValueError naming the line."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1].count("/") != 1 or "" in parts[1].split("/"):
            raise ValueError(f"line {number}: want `TOKEN NAMESPACE/SERVICEACCOUNT`")
        out[parts[0]] = spiffe(trust_domain, parts[1])
    return out


def read_identities(path: str, trust_domain: str) -> dict[str, str]:
    """The identities file, read at every call so that a change applies at once; ValueError."""
    try:
        data = read_regular_file(path, IDENTITIES_LIMIT)
    except UnreadableFile as err:
        raise ValueError(f"{path}: {err}") from None
    return parse_identities(data.decode("utf-8", "replace"), trust_domain)


class IdentitiesFile:
    """The identities file, parsed again only when it changed (a call costs a stat, not a parse:
    an unauthenticated flood must not make the control plane parse a large file per request)."""

    def __init__(self, path: str, trust_domain: str) -> None:
        self.path = path
        self.trust_domain = trust_domain
        self._seen: tuple[object, dict[str, str]] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, str]:
        signature = file_signature(self.path)
        with self._lock:
            if signature is not None and self._seen is not None and self._seen[0] == signature:
                return self._seen[1]
        identities = read_identities(self.path, self.trust_domain)  # ValueError: the caller logs it
        with self._lock:
            self._seen = (signature, identities)
        return identities


def token_caller(header: str | None, identities: Mapping[str, str]) -> Caller | None:
    """The caller named by `authorization: Bearer <token>`, if the token is listed."""
    token = bearer_token(header)
    if token is None:
        return None
    for known, identity in identities.items():  # compared in constant time, each
        if hmac.compare_digest(known.encode(), token.encode()):
            return Caller(identity, "token")
    return None


def certificate_caller(pem: bytes | None, ca: CertificateAuthority, now: datetime) -> Caller | None:
    """The caller named by a client certificate this CA signed and that is valid now (gRPC has
    already checked the chain to the root; this checks it again and reads the SPIFFE ID)."""
    if not pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(ca.cert)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except Exception:  # anything wrong with it: not an identity
        return None
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc or len(uris) != 1:
        return None
    return Caller(uris[0], "client certificate") if uris[0].startswith("spiffe://") else None


def _key_problem(key: object) -> str | None:
    """Why a CSR's key is not one to sign: RSA of 2048 to 8192 bits or ECDSA P-256/P-384 (what
    Istio's agents make), not DSA, Ed25519 or a 512-bit RSA key."""
    if isinstance(key, rsa.RSAPublicKey):
        return None if 2048 <= key.key_size <= 8192 else f"RSA of {key.key_size} bits (want 2048 to 8192)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return None if key.curve.name in ("secp256r1", "secp384r1") else f"ECDSA on {key.curve.name}"
    return f"{type(key).__name__.lstrip('_')} (want RSA or ECDSA)"


def decide(ca: CertificateAuthority, request: IstioCertificateRequest, caller: Caller | None,
           max_ttl: timedelta, now: datetime) -> list[str]:
    """The chain for `request` (the leaf, then the root), or Refused."""
    if caller is None:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no valid bearer token or client certificate")
    if len(request.csr) > MAX_CSR_BYTES:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        valid = csr.is_signature_valid
        asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound) as err:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"CSR does not parse or has no SAN: {err}") from None
    if not valid:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature does not verify")
    key_problem = _key_problem(csr.public_key())
    if key_problem:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"CSR key: {key_problem}")
    if asked != [caller.identity]:
        raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                      f"CSR asks for {', '.join(asked) or 'no identity'}; the caller is {caller.identity}")
    seconds = int(request.validity_duration)  # clamped before a timedelta is made of it (it overflows past ~8e13 s)
    ttl = timedelta(seconds=min(float(seconds), max_ttl.total_seconds())) if seconds > 0 else min(DEFAULT_TTL, max_ttl)
    leaf = sign_leaf(ca, csr.public_key(), [x509.UniformResourceIdentifier(caller.identity)], WORKLOAD_USAGES,
                     now, ttl)
    return [cert_pem(leaf).decode(), cert_pem(ca.cert).decode()]


class CertificateService:
    """The gRPC shell of `decide`."""

    def __init__(self, ca: CertificateAuthority, identities: Callable[[], Mapping[str, str]], max_ttl: timedelta,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 peer_certificate: Callable[[str], bytes | None] | None = None,
                 review: Callable[[str], str] | None = None) -> None:
        """`peer_certificate` gives a caller's client certificate (PEM) by its gRPC peer address
        (controlplane/tlsfront.py); without it, gRPC's own TLS is asked. `review` gives the
        SPIFFE ID of a bearer token the identities file does not list, or raises ReviewFailed
        (the Kubernetes TokenReview, controlplane/tokenreview.py)."""
        self.ca = ca
        self.review = review
        self.peer_certificate = peer_certificate
        self.identities = identities
        self.max_ttl = max_ttl
        self.clock = clock
        self.issued = 0
        self.refused = 0
        # Refusals come from whoever can reach the port: one line per interval, the count in
        # `refused` (common/ratelog.py).
        self._refusal_log = RateLimitedLog(log)
        self._file_log = RateLimitedLog(log)
        self._review_log = RateLimitedLog(log)

    def _reviewed(self, header: str | None) -> Caller | None:
        """The caller the token review names, or None (logged, at most once per interval: the
        API server down must be visible, a flood of bad tokens must not fill the log)."""
        token = bearer_token(header)
        if self.review is None or token is None:
            return None
        try:
            return Caller(self.review(token), "token review")
        except ReviewFailed as err:
            self._review_log(logging.WARNING, "controlplane: token review: %s", err)
            return None

    def _caller(self, context: grpc.ServicerContext, now: datetime) -> Caller | None:
        value = dict(context.invocation_metadata()).get("authorization")
        try:
            identities = self.identities()
        except ValueError as err:
            self._file_log(logging.ERROR, "controlplane: identities file: %s; no token is accepted", err)
            identities = {}
        header = value if isinstance(value, str) else None
        caller = token_caller(header, identities)
        if caller is None:
            if self.peer_certificate is not None:
                pem = self.peer_certificate(context.peer())
            else:
                pem = (context.auth_context().get("x509_pem_cert") or [None])[0]
            caller = certificate_caller(pem, self.ca, now)
        # the API server last (as istiod tries the client certificate before the token): a renewal
        # costs no review
        return caller or self._reviewed(header)

    def create(self, request: IstioCertificateRequest, context: grpc.ServicerContext) -> IstioCertificateResponse:
        now = self.clock()
        caller = self._caller(context, now)
        try:
            chain = decide(self.ca, request, caller, self.max_ttl, now)
        except Refused as refused:
            self.refused += 1
            self._refusal_log(logging.WARNING, "controlplane: refused a certificate to %s (%s): %s", context.peer(),
                              caller.identity if caller else "unauthenticated", refused)
            context.abort(refused.code, str(refused))
        self.issued += 1
        log.info("controlplane: issued a certificate for %s (%s) to %s", caller.identity if caller else "?",
                 caller.via if caller else "?", context.peer())
        return IstioCertificateResponse(cert_chain=chain)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            METHOD: grpc.unary_unary_rpc_method_handler(
                self.create,
                request_deserializer=IstioCertificateRequest.FromString,
                response_serializer=IstioCertificateResponse.SerializeToString,
            ),
        })
