"""The start-up checks of the files the agent reads: what makes a root certificate or a token
file unusable, on real files."""

from __future__ import annotations

import binascii
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pilotfish.agent.files import MISSING, is_certificate, root_cert_problem, saved_table_problem, token_problem
from pilotfish.controlplane.ca import cert_pem, issue_serving, new_key, new_root, serving_names

SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def test_root_certificate_checks(tmp_path: Path) -> None:
    good = tmp_path / "root.pem"
    good.write_bytes(cert_pem(new_root(new_key(), datetime.now(UTC)).cert))
    assert root_cert_problem(str(good)) is None
    assert root_cert_problem(str(tmp_path / "nope")) == MISSING
    assert root_cert_problem(str(tmp_path)) == "is a directory"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert root_cert_problem(str(fifo)) == "is not a regular file"  # and did not block
    pem = good.read_bytes()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"# comment\n" + pem.replace(b"CERTIFICATE", b"X509 CRL") + pem)
    assert root_cert_problem(str(bundle)) is None
    body = pem.split(b"\n")
    for name, data in (("empty", b" \n"), ("text", b"hello\n"), ("binary", b"\xff\xfe"),
                       ("key", b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"),
                       ("junk", b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"),
                       ("truncated", b"\n".join(body[:3] + body[-2:])),
                       ("bad-base64", b"-----BEGIN CERTIFICATE-----\nMIIB!\n-----END CERTIFICATE-----\n")):
        path = tmp_path / name
        path.write_bytes(data)
        assert root_cert_problem(str(path)) == ("is empty" if name == "empty" else "holds no PEM certificate"), name


def _ders() -> dict[str, bytes]:
    """DER structures of every kind a PEM file may hold, from `cryptography`."""
    now = datetime.now(UTC)
    key = new_key()
    root = new_root(key, now)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(now).next_update(now)
           .sign(key, hashes.SHA256()))
    der = serialization.Encoding.DER
    return {
        "root": root.cert.public_bytes(der),
        "leaf": issue_serving(root, new_key(), serving_names(), now).public_bytes(der),
        "csr": csr.public_bytes(der),
        "crl": crl.public_bytes(der),
        "private-key": key.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "public-key": key.public_key().public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo),
    }


def test_certificates_have_a_certificates_outline() -> None:
    ders = _ders()
    assert is_certificate(ders["root"]) and is_certificate(ders["leaf"])
    for kind in ("csr", "crl", "private-key", "public-key"):
        assert not is_certificate(ders[kind]), kind


@pytest.mark.skipif(not SYSTEM_BUNDLE.exists(), reason=f"no {SYSTEM_BUNDLE} here")
def test_every_certificate_of_the_system_bundle_is_one() -> None:
    """No false refusals: the check passes every root a distribution ships (RSA, EC, v1, v3, old
    and new encoders)."""
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", SYSTEM_BUNDLE.read_bytes(), re.DOTALL)
    assert blocks and all(is_certificate(binascii.a2b_base64(block)) for block in blocks)


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element (long-form length where needed)."""
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _broken() -> dict[str, bytes]:
    """A certificate taken apart (tbsCertificate, signatureAlgorithm, signatureValue) and put
    back together with one thing wrong each."""
    cert = new_root(new_key(), datetime.now(UTC)).cert
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    sig = tlv(0x03, b"\x00" + cert.signature)
    alg = der[der.index(tbs) + len(tbs):len(der) - len(sig)]
    assert tlv(0x30, tbs + alg + sig) == der
    return {
        "empty-sequence": tlv(0x30, b""),  # MAA=
        "trailing-byte": der + b"\x00",
        "truncated": der[:-1],
        "outer-not-sequence": tlv(0x31, tbs + alg + sig),
        "no-signature": tlv(0x30, tbs + alg),
        "signature-not-bit-string": tlv(0x30, tbs + alg + tlv(0x04, cert.signature)),
        "empty-tbs": tlv(0x30, tlv(0x30, b"") + alg + sig),
        "tbs-of-nulls": tlv(0x30, tlv(0x30, b"\x05\x00" * 8) + alg + sig),
        "three-empty-parts": tlv(0x30, tlv(0x30, b"") + tlv(0x30, b"") + tlv(0x03, b"")),
    }


BROKEN = _broken()

TIME = tlv(0x17, b"260101000000Z")
TBS_PARTS = {  # a tbsCertificate's outline, in order, built by hand
    "version": tlv(0xA0, tlv(0x02, b"\x02")),
    "serial": tlv(0x02, b"\x01"),
    "signature": tlv(0x30, tlv(0x06, b"\x2a\x86\x48\xce\x3d\x04\x03\x02")),
    "issuer": tlv(0x30, b""),
    "validity": tlv(0x30, TIME + TIME),
    "subject": tlv(0x30, b""),
    "key": tlv(0x30, tlv(0x30, b"") + tlv(0x03, b"\x00")),
    "extensions": tlv(0xA3, tlv(0x30, b"")),
}


def outline(**parts: bytes) -> bytes:
    """A certificate's DER outline from TBS_PARTS, some replaced (b"" leaves one out)."""
    tbs = b"".join(parts.get(name, der) for name, der in TBS_PARTS.items())
    return tlv(0x30, tlv(0x30, tbs) + tlv(0x30, b"") + tlv(0x03, b"\x00"))


def test_a_hand_built_outline_is_a_certificate_and_optional_parts_may_be_left_out() -> None:
    assert is_certificate(outline())
    assert is_certificate(outline(version=b"", extensions=b""))
    assert is_certificate(outline(validity=tlv(0x30, TIME + tlv(0x18, b"20500101000000Z"))))


@pytest.mark.parametrize("part", ["serial", "signature", "issuer", "validity", "subject", "key"])
def test_an_outline_without_a_required_part_is_refused(part: str) -> None:
    assert not is_certificate(outline(**{part: b""}))


@pytest.mark.parametrize("part,der", [
    ("validity", tlv(0x30, TIME)), ("validity", tlv(0x30, TIME + tlv(0x02, b"\x01"))),
    ("key", tlv(0x30, tlv(0x30, b""))), ("extensions", tlv(0xA3, b"") + tlv(0xA1, b"")),
    ("serial", tlv(0x05, b"")), ("extensions", tlv(0xA4, b"")),
], ids=["one-time", "time-and-integer", "key-without-bits", "optional-parts-out-of-order", "serial-not-integer",
        "unknown-tbs-part"])
def test_an_outline_with_a_wrong_part_is_refused(part: str, der: bytes) -> None:
    assert not is_certificate(outline(**{part: der}))


@pytest.mark.parametrize("kind", list(BROKEN))
def test_der_without_a_certificates_outline_is_refused(kind: str) -> None:
    assert not is_certificate(BROKEN[kind])


def test_a_certificate_block_holding_an_empty_sequence_is_no_certificate(tmp_path: Path) -> None:
    """The review's case: `MAA=` (an empty DER SEQUENCE) in a CERTIFICATE block passed the old
    check, which looked at the outer SEQUENCE only."""
    path = tmp_path / "root.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n")
    assert root_cert_problem(str(path)) == "holds no PEM certificate"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_root(tmp_path: Path) -> None:
    path = tmp_path / "root.pem"
    path.write_text("x")
    path.chmod(0)
    assert root_cert_problem(str(path)) == "cannot be read: Permission denied"


def test_token_checks(tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    assert token_problem(str(token)) is None  # not yet written by kubelet: Istio sends no header
    token.write_text("")
    assert token_problem(str(token)) is None
    token.write_text("eyJhbGciOi.x.y\n")
    assert token_problem(str(token)) is None
    token.write_bytes(b"\xff\xfe")
    assert token_problem(str(token)) == "is not UTF-8 text"
    for bad in ("eyJ\nx.y", "jeton-\u00e9t\u00e9"):  # gRPC refuses such a header at every stream
        token.write_text(bad)
        assert token_problem(str(token)) == "holds characters a header cannot carry (control characters or non-ASCII)"
    token.unlink()
    token.mkdir()
    assert token_problem(str(token)) == "is a directory"


def test_saved_table_path_checks(tmp_path: Path) -> None:
    assert saved_table_problem(str(tmp_path / "var/lib/pilotfish/nametable.pb")) is None  # first start
    (tmp_path / "t.pb").write_bytes(b"\xff")  # does not load: moved aside at start, not refused
    assert saved_table_problem(str(tmp_path / "t.pb")) is None
    assert saved_table_problem(str(tmp_path)) == "is a directory"
    assert saved_table_problem(str(tmp_path / "t.pb" / "x.pb")) == "has a parent that is not a directory"
    os.mkfifo(tmp_path / "fifo")
    assert saved_table_problem(str(tmp_path / "fifo")) == "is not a regular file"
