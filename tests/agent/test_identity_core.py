"""The identity's pure core: keys and CSRs as Istio's agent makes them (checked by openssl),
the renewal time, and the checks a CA response must pass before it serves."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pilotfish.agent.identity.issued import IssueError, check_response, join_chain
from pilotfish.agent.identity.keys import KeySpec, csr_pem, key_pem, new_key, spiffe_id
from pilotfish.agent.identity.renewal import failure_delay, life_left, present_current, token_usable
from pilotfish.agent.identity.rotation import grace_ratio, renew_at, renewal_delay
from pilotfish.common.tokens import token_expiry
from pilotfish.controlplane.ca import cert_pem, new_key as ca_key, new_root, sign_leaf

ID = spiffe_id("cluster.local", "default", "productpage")
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
CLIENT_SERVER = [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_spiffe_id_as_istio_writes_it() -> None:
    assert ID == "spiffe://cluster.local/ns/default/sa/productpage"
    assert spiffe_id("", "ns", "sa") == "spiffe:///ns/ns/sa/sa"


@pytest.mark.parametrize(("spec", "kind", "size"), [
    (KeySpec(), rsa.RSAPrivateKey, 2048),
    (KeySpec(rsa_bits=1024), rsa.RSAPrivateKey, 2048),  # 2048 at least, as Istio enforces
    (KeySpec(algorithm="ECDSA"), ec.EllipticCurvePrivateKey, 256),
    (KeySpec(algorithm="ECDSA", curve="P384"), ec.EllipticCurvePrivateKey, 384),
    (KeySpec(algorithm="ECDSA", curve="P521"), ec.EllipticCurvePrivateKey, 256),  # anything else: P-256
], ids=["rsa-default", "rsa-min", "p256", "p384", "unknown-curve"])
def test_key_kinds(spec: KeySpec, kind: type, size: int) -> None:
    key = new_key(spec)
    assert isinstance(key, kind) and key.key_size == size


@pytest.mark.parametrize(("spec", "header"), [
    (KeySpec(algorithm="ECDSA"), b"-----BEGIN EC PRIVATE KEY-----"),
    (KeySpec(algorithm="ECDSA", pkcs8=True), b"-----BEGIN PRIVATE KEY-----"),
    (KeySpec(), b"-----BEGIN RSA PRIVATE KEY-----"),
])
def test_key_pem_forms(spec: KeySpec, header: bytes) -> None:
    assert key_pem(new_key(spec), spec.pkcs8).startswith(header)


@pytest.mark.parametrize("spec", [KeySpec(algorithm="ECDSA"), KeySpec(algorithm="ECDSA", curve="P384"), KeySpec()],
                         ids=["p256", "p384", "rsa"])
def test_csr_has_one_critical_spiffe_san_and_verifies_with_openssl(spec: KeySpec) -> None:
    pem = csr_pem(new_key(spec), ID)
    verified = subprocess.run(["openssl", "req", "-noout", "-verify", "-text"], input=pem, capture_output=True,
                              timeout=30)
    assert verified.returncode == 0, verified.stderr
    text = verified.stdout.decode()
    assert "X509v3 Subject Alternative Name: critical" in text and f"URI:{ID}" in text
    csr = x509.load_pem_x509_csr(pem)
    assert list(csr.subject) == [] and len(csr.extensions) == 1
    want = "sha384" if spec.curve == "P384" and spec.ecdsa else "sha256"
    assert csr.signature_hash_algorithm is not None and csr.signature_hash_algorithm.name == want


def test_grace_ratio_is_clamped_and_jittered_both_ways() -> None:
    assert grace_ratio(0.5, 0.01, 0.0) == pytest.approx(0.49)
    assert grace_ratio(0.5, 0.01, 0.5) == pytest.approx(0.5)
    assert grace_ratio(0.5, 0.01, 0.999999) == pytest.approx(0.51, abs=1e-6)
    assert grace_ratio(0.99, 0.5, 0.99) == 1.0 and grace_ratio(0.01, 0.5, 0.0) == 0.0


def test_a_day_long_certificate_is_renewed_after_about_half_its_life() -> None:
    day = 86400.0
    assert renew_at(0.0, day, 0.5, 0.01, 0.5) == pytest.approx(day / 2)
    assert renew_at(0.0, day, 0.5, 0.01, 0.0) == pytest.approx(day * 0.51)  # grace 0.49: later
    assert renewal_delay(day, 0.0, day, 0.5, 0.01, 0.5) == 0.0  # overdue: now
    assert renewal_delay(100.0, 0.0, day, 0.5, 0.01, 0.5) == pytest.approx(day / 2 - 100)


class CA:
    """A root and an intermediate, signing as the project's control plane signs."""

    def __init__(self) -> None:
        self.root = new_root(ca_key(), NOW - timedelta(days=1))

    def issue(self, public_key: object, names: list[x509.GeneralName], at: datetime = NOW) -> x509.Certificate:
        return sign_leaf(self.root, public_key, names, CLIENT_SERVER, at, timedelta(hours=1))  # type: ignore[arg-type]

    def chain(self, leaf: x509.Certificate) -> list[str]:
        return [cert_pem(leaf).decode(), cert_pem(self.root.cert).decode()]


@pytest.fixture
def ca() -> CA:
    return CA()


def _check(ca: CA, elements: list[str], key: object, roots: list[x509.Certificate] | None = None):  # type: ignore[no-untyped-def]
    return check_response(elements, key, b"KEY", ID, [ca.root.cert] if roots is None else roots, NOW)  # type: ignore[arg-type]


def test_a_good_response_serves_with_the_root_in_the_chain(ca: CA) -> None:
    key = new_key(KeySpec(algorithm="ECDSA"))
    leaf = ca.issue(key.public_key(), [x509.UniformResourceIdentifier(ID)])
    issued = _check(ca, ca.chain(leaf), key)
    assert issued.chain_pem == (cert_pem(leaf) + cert_pem(ca.root.cert))
    assert issued.root_pem == cert_pem(ca.root.cert) and issued.serial == leaf.serial_number
    assert issued.not_after == leaf.not_valid_after_utc and issued.created == NOW


def test_join_chain_puts_a_newline_only_where_one_is_missing() -> None:
    assert join_chain(["a", "b\n", "c"]) == b"a\nb\nc"


@pytest.mark.parametrize("case", ["one-element", "another-key", "wrong-san", "two-sans", "wrong-root",
                                  "unconfigured-root", "garbage", "expired"])
def test_a_bad_response_is_an_error(ca: CA, case: str) -> None:
    key = new_key(KeySpec(algorithm="ECDSA"))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ID)]
    if case == "wrong-san":
        names = [x509.UniformResourceIdentifier(spiffe_id("cluster.local", "default", "admin"))]
    if case == "two-sans":
        names.append(x509.UniformResourceIdentifier(spiffe_id("cluster.local", "default", "admin")))
    public = new_key(KeySpec(algorithm="ECDSA")).public_key() if case == "another-key" else key.public_key()
    leaf = ca.issue(public, names, NOW - timedelta(hours=12) if case == "expired" else NOW)
    elements = ca.chain(leaf)
    roots = None
    if case == "one-element":
        elements = elements[:1]
    elif case == "wrong-root":
        elements[-1] = cert_pem(CA().root.cert).decode()
    elif case == "unconfigured-root":
        roots = [CA().root.cert]
    elif case == "garbage":
        elements[0] = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    with pytest.raises(IssueError) as err:
        _check(ca, elements, key, roots)
    words = {"one-element": "chain of 1 element", "another-key": "another key", "wrong-san": "want spiffe://",
             "two-sans": "want spiffe://", "wrong-root": "no root of the response signed",
             "unconfigured-root": "not a configured root", "garbage": "does not parse", "expired": "not now"}
    assert words[case] in str(err.value)


def test_the_current_certificate_is_presented_only_when_the_token_cannot_authenticate() -> None:
    assert token_usable("t", None, 100.0) and token_usable("t", 101.0, 100.0)
    assert not token_usable("", None, 100.0) and not token_usable("t", 100.0, 100.0)
    assert present_current(token_ok=False, prov_cert_valid=False, current_valid=True)
    assert not present_current(token_ok=True, prov_cert_valid=False, current_valid=True)
    assert not present_current(token_ok=False, prov_cert_valid=True, current_valid=True)  # PROV_CERT's first
    assert not present_current(token_ok=False, prov_cert_valid=False, current_valid=False)


def test_failures_back_off_to_two_minutes_and_life_left_is_a_share() -> None:
    assert failure_delay(1, 0.999) == pytest.approx(0.999)
    assert failure_delay(3, 0.5) == pytest.approx(2.0)
    assert failure_delay(100, 0.999) == pytest.approx(119.88)
    assert life_left(50.0, 0.0, 100.0) == 0.5 and life_left(150.0, 0.0, 100.0) == 0.0
    assert life_left(0.0, 10.0, 10.0) == 0.0


def test_a_jwt_expiry_is_read_without_verifying_and_anything_else_has_none() -> None:
    import base64
    import json

    def jwt(claims: object) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"

    assert token_expiry(jwt({"exp": 1700000000})) == 1700000000.0
    assert token_expiry(jwt({"sub": "x"})) is None and token_expiry(jwt({"exp": True})) is None
    assert token_expiry(jwt([1])) is None and token_expiry("opaque-token") is None
    assert token_expiry("a.!!!.c") is None


def test_a_leaf_whose_extensions_do_not_parse_is_an_error_not_a_crash(ca: CA) -> None:
    """An empty ExtendedKeyUsage makes `cert.extensions` raise ValueError (hostile review): that
    ended the identity component, and the agent with it."""
    key = new_key(KeySpec(algorithm="ECDSA"))
    leaf = sign_leaf(ca.root, key.public_key(), [x509.UniformResourceIdentifier(ID)], [], NOW,
                     timedelta(hours=1))
    with pytest.raises(IssueError, match="cannot be checked|want spiffe"):
        _check(ca, ca.chain(leaf), key)


def test_the_root_bundle_may_hold_only_configured_roots_and_is_bounded(ca: CA) -> None:
    key = new_key(KeySpec(algorithm="ECDSA"))
    leaf = ca.issue(key.public_key(), [x509.UniformResourceIdentifier(ID)])
    stranger = cert_pem(CA().root.cert).decode()
    with pytest.raises(IssueError, match="not a configured root"):  # it would become Envoy's trust
        _check(ca, [ca.chain(leaf)[0], stranger + ca.chain(leaf)[1]], key)
    with pytest.raises(IssueError, match="more than 64 certificates"):
        _check(ca, [ca.chain(leaf)[0], ca.chain(leaf)[1] * 70], key)
