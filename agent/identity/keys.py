"""A fresh key and its CSR for every certificate, as Istio's agent makes them (docs/identity.md
"Key and CSR").

RSA 2048 by default (`WORKLOAD_RSA_KEY_SIZE`, 2048 at least); ECDSA P-256 or P-384 with
`ECC_SIGNATURE_ALGORITHM=ECDSA` (`ECC_CURVE`; anything else is P-256, as Istio). An ECDSA key
takes well under a millisecond; an RSA 2048 key tens to hundreds (BENCHMARKS.md "Identity").
The CSR has an empty subject and one critical subjectAltName: the workload's SPIFFE ID (the CA
issues for the identity it authenticated; the SAN says which one is wanted). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class KeySpec:
    """What kind of key to make, from Istio's settings."""

    algorithm: str = "RSA"  # ECC_SIGNATURE_ALGORITHM: "ECDSA" for ECDSA, anything else RSA
    rsa_bits: int = 2048  # WORKLOAD_RSA_KEY_SIZE
    curve: str = "P256"  # ECC_CURVE: P256 or P384
    pkcs8: bool = False  # PKCS8_KEY: the key PEM as PKCS#8 instead of PKCS#1 / SEC1

    @property
    def ecdsa(self) -> bool:
        return self.algorithm == "ECDSA"


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """`spiffe://<trust domain>/ns/<namespace>/sa/<service account>` (an empty trust domain gives
    `spiffe:///ns/...`, as in Istio)."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def new_key(spec: KeySpec) -> PrivateKey:
    if spec.ecdsa:
        return ec.generate_private_key(ec.SECP384R1() if spec.curve == "P384" else ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=max(spec.rsa_bits, MIN_RSA_BITS))


def key_pem(key: PrivateKey, pkcs8: bool) -> bytes:
    """PKCS#1 `RSA PRIVATE KEY` / SEC1 `EC PRIVATE KEY`, or PKCS#8 `PRIVATE KEY`."""
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def csr_pem(key: PrivateKey, identity: str) -> bytes:
    """The CSR for `identity` signed with `key`: SHA-384 for a P-384 key, SHA-256 otherwise."""
    p384 = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    digest = hashes.SHA384() if p384 else hashes.SHA256()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, digest)
    )
    return csr.public_bytes(serialization.Encoding.PEM)
