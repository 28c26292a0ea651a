"""A certificate the CA issued, checked before it can serve (docs/identity.md "CA responses").

Istio's agent takes the response as it comes (only a chain of one element is an error). Here a
response serves only when every check passes, else it is an error and the certificate in use
stays: the chain has the leaf first and the root last (two elements at least); the leaf is for
our key and our SPIFFE ID and is valid now; each certificate is signed by the next; the root
is one of the configured roots (when roots are configured). Expiry is the leaf's, so a CA that
ignores the TTL asked for is handled. Pure: the time is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from .keys import PrivateKey


class IssueError(ValueError):
    """A response that must not serve; the message says which check failed."""


@dataclass(frozen=True)
class Issued:
    """A workload certificate as served to Envoy: the chain (root included, as Istio gives it),
    the key, the root bundle, and its times."""

    chain_pem: bytes
    key_pem: bytes
    root_pem: bytes
    not_after: datetime
    created: datetime
    serial: int


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"the certificate with serial {cert.serial_number:x}"


def join_chain(elements: Sequence[str]) -> bytes:
    """The elements as one PEM text, a newline put between those that lack one (Istio's rule)."""
    out = ""
    for element in elements:
        if out and not out.endswith("\n"):
            out += "\n"
        out += element
    return out.encode()


MAX_RESPONSE_BYTES = 1 << 20  # a chain and a root bundle are a few KiB; a CA bundle ~220 KiB
MAX_CERTIFICATES = 64


def check_response(elements: Sequence[str], key: PrivateKey, key_pem: bytes, identity: str,
                   trusted_roots: Sequence[x509.Certificate], now: datetime) -> Issued:
    """The Issued certificate from a CreateCertificate response's `cert_chain`, or IssueError,
    whatever the response holds (a certificate whose extensions do not parse included)."""
    try:
        return _check(elements, key, key_pem, identity, trusted_roots, now)
    except IssueError:
        raise
    except Exception as err:  # anything a hostile or broken CA sends: an error, never a crash
        raise IssueError(f"the CA returned what cannot be checked: {type(err).__name__}: {err}") from None


def _check(elements: Sequence[str], key: PrivateKey, key_pem: bytes, identity: str,
           trusted_roots: Sequence[x509.Certificate], now: datetime) -> Issued:
    if sum(len(element) for element in elements) > MAX_RESPONSE_BYTES:
        raise IssueError(f"the CA returned more than {MAX_RESPONSE_BYTES} bytes of certificates")
    if len(elements) < 2:
        raise IssueError(f"the CA returned a chain of {len(elements)} element(s); want the leaf first and the root last")
    try:
        chain = [cert for element in elements[:-1] for cert in x509.load_pem_x509_certificates(element.encode())]
        roots = x509.load_pem_x509_certificates(elements[-1].encode())
    except ValueError as err:
        raise IssueError(f"the CA returned a chain that does not parse: {err}") from None
    if len(chain) + len(roots) > MAX_CERTIFICATES:
        raise IssueError(f"the CA returned more than {MAX_CERTIFICATES} certificates")
    leaf = chain[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise IssueError("the CA returned a leaf certificate for another key")
    ids = _spiffe_ids(leaf)
    if ids != [identity]:
        raise IssueError(f"the CA returned a leaf for {', '.join(ids) or 'no SPIFFE ID'}; want {identity}")
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise IssueError(f"the CA returned a leaf valid from {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} "
                         f"to {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not now")
    for cert, issuer in zip(chain, chain[1:]):
        if not _issued_by(cert, issuer):
            raise IssueError(f"the chain does not verify: {_name(cert)} is not signed by {_name(issuer)}")
    root = next((root for root in roots if _issued_by(chain[-1], root)), None)
    if root is None:
        raise IssueError(f"the chain does not verify: no root of the response signed {_name(chain[-1])}")
    if trusted_roots and root not in trusted_roots:
        raise IssueError(f"the chain ends in {_name(root)}, which is not a configured root")
    if trusted_roots and any(other not in trusted_roots for other in roots):
        # the root bundle becomes Envoy's trust (ROOTCA): a CA must not add to it
        raise IssueError("the root bundle holds a certificate that is not a configured root")
    return Issued(join_chain(elements), key_pem, elements[-1].encode(), leaf.not_valid_after_utc, now,
                  leaf.serial_number)
