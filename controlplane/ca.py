"""The control plane's certificate authority: a self-signed root and the certificates it signs.

Pure functions over `cryptography`: keys, certificates and the current time (an aware UTC
datetime) go in, keys and certificates come out; the disk is the command's business. The root is ECDSA P-256 for ten years,
like the self-signed root istiod makes for itself; the serving certificate carries the names an
agent checks when it dials istiod (`istiod.istio-system.svc`, or `localhost` rewritten to it:
docs/istio-compat.md "ADS stream to istiod"). `sign_leaf` is the one signing path, so that issuing workload
certificates (a SPIFFE URI SAN instead of DNS names) later is a new caller, not a new signer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_VALIDITY = timedelta(days=3650)
SERVING_VALIDITY = timedelta(days=365)
# Peers whose clock runs a little behind ours must still accept a certificate issued just now.
BACKDATE = timedelta(minutes=5)

ISTIOD_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "istiod",
    "localhost",
)
LOOPBACK_IPS = ("127.0.0.1", "::1")


class CAError(ValueError):
    """A key or certificate is unusable as this CA's root; the message says why."""


@dataclass(frozen=True)
class CertificateAuthority:
    """The root's key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_root(key: ec.EllipticCurvePrivateKey, now: datetime,
             common_name: str = "pilotfish root CA") -> CertificateAuthority:
    """A self-signed root valid for ten years from `now` (backdated a little)."""
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pilotfish"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def parse_san(value: str) -> x509.GeneralName:
    """An IP literal becomes an IP SAN, anything else a DNS name; ValueError if it can be neither."""
    value = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not value or not value.isascii() or any(c.isspace() or c in "/:@" for c in value):
        raise ValueError(f"not a DNS name or IP address: {value!r}")
    return x509.DNSName(value.rstrip(".").lower())


def serving_names(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """istiod's names and the loopback addresses, then `extra` (each once, in order)."""
    names: list[x509.GeneralName] = []
    for value in (*ISTIOD_NAMES, *LOOPBACK_IPS, *extra):
        san = parse_san(value)
        if san not in names:
            names.append(san)
    return names


def sign_leaf(ca: CertificateAuthority, public_key: CertificatePublicKeyTypes,
              names: Sequence[x509.GeneralName], usages: Sequence[x509.ObjectIdentifier],
              now: datetime, validity: timedelta) -> x509.Certificate:
    """An end-entity certificate for `public_key`, never outliving the root.

    The subject is empty and the SANs are critical, as RFC 5280 asks and as Istio's certificates
    are: identity lives in the SANs only. Key encipherment only for RSA keys (Istio's agents make
    RSA keys by default), where it means something.
    """
    not_after = min(now + validity, ca.cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )


def issue_serving(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey,
                  names: Sequence[x509.GeneralName], now: datetime) -> x509.Certificate:
    """The control plane's own TLS server certificate, valid for a year."""
    return sign_leaf(ca, key.public_key(), names, [ExtendedKeyUsageOID.SERVER_AUTH], now,
                     SERVING_VALIDITY)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_root(key_data: bytes, cert_data: bytes, now: datetime) -> CertificateAuthority:
    """A stored root, checked: an EC key, a CA certificate for that key, valid at `now`."""
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as err:
        raise CAError(f"root key: not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError("root key: not an EC key")
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as err:
        raise CAError(f"root certificate: not a PEM certificate: {err}") from None
    if cert.public_key() != key.public_key():
        raise CAError("root certificate and root key do not belong together")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CAError("root certificate is not a CA certificate")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CAError(
            f"root certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )
    return CertificateAuthority(key, cert)
