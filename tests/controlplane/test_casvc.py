"""The control plane's CreateCertificate: identity from the token or the client certificate,
never from the CSR; another identity asked for is PERMISSION_DENIED; the TTL is capped. Over a
real TLS gRPC server, with and without a client certificate."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from pilotfish.agent.identity.keys import KeySpec, csr_pem, new_key, spiffe_id
from pilotfish.controlplane.ca import cert_pem, issue_serving, new_root, serving_names
from pilotfish.controlplane.ca import key_pem as ca_key_pem
from pilotfish.controlplane.ca import new_key as ca_new_key
from pilotfish.controlplane.casvc import (
    METHOD,
    SERVICE,
    Caller,
    CertificateService,
    IdentitiesFile,
    Refused,
    certificate_caller,
    decide,
    parse_identities,
)
from pilotfish.xds_client.proto.istio.v1.auth.ca_pb2 import IstioCertificateRequest, IstioCertificateResponse

NOW = datetime.now(UTC)
ID = spiffe_id("cluster.local", "default", "productpage")
ROOT = new_root(ca_new_key(), NOW - timedelta(days=1))


def request(identity: str = ID, ttl: int = 3600) -> tuple[IstioCertificateRequest, object]:
    key = new_key(KeySpec(algorithm="ECDSA"))
    return IstioCertificateRequest(csr=csr_pem(key, identity).decode(), validity_duration=ttl), key


def test_a_lifetime_past_what_a_timedelta_holds_is_capped_not_a_crash() -> None:
    req, _ = request(ttl=2**62)
    chain = decide(ROOT, req, Caller(ID, "token"), timedelta(hours=2), NOW)
    assert x509.load_pem_x509_certificate(chain[0].encode()).not_valid_after_utc - NOW <= timedelta(hours=2)


def test_the_identities_file_is_parsed_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "identities"
    path.write_text("tok default/a\n")
    identities = IdentitiesFile(str(path), "td")
    first = identities()
    assert identities() is first  # a stat, not a parse
    replacement = tmp_path / "new"
    replacement.write_text("tok default/b\n")
    os.replace(replacement, path)
    assert identities() == {"tok": "spiffe://td/ns/default/sa/b"}


def test_identities_file_lines() -> None:
    assert parse_identities("# comment\n\ntok1 default/productpage\n tok2  ns2/sa2 \n", "td") == {
        "tok1": "spiffe://td/ns/default/sa/productpage", "tok2": "spiffe://td/ns/ns2/sa/sa2"}
    for bad in ("tok1", "tok1 default", "tok1 default/", "tok1 a/b/c", "tok1 a/b extra"):
        with pytest.raises(ValueError, match="line 1"):
            parse_identities(bad, "td")


def test_a_caller_gets_a_certificate_for_its_identity_with_the_ttl_capped() -> None:
    req, key = request(ttl=30 * 86400)
    chain = decide(ROOT, req, Caller(ID, "token"), timedelta(hours=2), NOW)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    assert chain[1] == cert_pem(ROOT.cert).decode()
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [ID]
    assert leaf.not_valid_after_utc - NOW <= timedelta(hours=2)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]
    leaf.verify_directly_issued_by(ROOT.cert)


def test_a_csr_key_that_is_not_rsa_2048_to_8192_or_ecdsa_p256_p384_is_refused() -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

    for key, words in ((rsa.generate_private_key(65537, 1024), "RSA of 1024 bits"),
                       (ec.generate_private_key(ec.SECP521R1()), "ECDSA on secp521r1"),
                       (dsa.generate_private_key(2048), "want RSA or ECDSA"),
                       (ed25519.Ed25519PrivateKey.generate(), "want RSA or ECDSA")):
        digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), critical=True)
               .sign(key, digest))  # type: ignore[arg-type]
        req = IstioCertificateRequest(csr=csr.public_bytes(serialization.Encoding.PEM).decode())
        with pytest.raises(Refused, match=words) as refused:
            decide(ROOT, req, Caller(ID, "token"), timedelta(hours=1), NOW)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("case", "code"), [
    ("unauthenticated", grpc.StatusCode.UNAUTHENTICATED),
    ("other-identity", grpc.StatusCode.PERMISSION_DENIED),
    ("garbage", grpc.StatusCode.INVALID_ARGUMENT),
    ("huge", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_refusals(case: str, code: grpc.StatusCode) -> None:
    req, _ = request(spiffe_id("cluster.local", "default", "admin") if case == "other-identity" else ID)
    if case == "garbage":
        req.csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    if case == "huge":
        req.csr = "x" * (65 * 1024)
    caller = None if case == "unauthenticated" else Caller(ID, "token")
    with pytest.raises(Refused) as refused:
        decide(ROOT, req, caller, timedelta(hours=24), NOW)
    assert refused.value.code == code


@pytest.fixture
def server() -> Iterator[tuple[str, CertificateService]]:
    service = CertificateService(ROOT, lambda: {"good-token": ID}, timedelta(hours=24))
    serving_key = ca_new_key()
    serving = issue_serving(ROOT, serving_key, serving_names(), NOW)
    credentials = grpc.ssl_server_credentials([(ca_key_pem(serving_key), cert_pem(serving))],
                                              root_certificates=cert_pem(ROOT.cert), require_client_auth=False)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    grpc_server.add_generic_rpc_handlers((service.handler(),))
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    yield f"127.0.0.1:{port}", service
    grpc_server.stop(None)


def call(address: str, req: IstioCertificateRequest, token: str | None = None,
         client: tuple[bytes, bytes] | None = None) -> IstioCertificateResponse:
    credentials = grpc.ssl_channel_credentials(cert_pem(ROOT.cert), *(client or (None, None)))
    with grpc.secure_channel(address, credentials,
                             options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")]) as channel:
        create = channel.unary_unary(f"/{SERVICE}/{METHOD}", request_serializer=IstioCertificateRequest.SerializeToString,
                                     response_deserializer=IstioCertificateResponse.FromString)
        metadata = [("authorization", f"Bearer {token}")] if token else []
        return create(req, metadata=metadata, timeout=10)  # type: ignore[no-any-return]


def test_over_grpc_a_token_gets_a_certificate(server: tuple[str, CertificateService]) -> None:
    address, service = server
    req, key = request()
    response = call(address, req, token="good-token")
    assert len(response.cert_chain) == 2 and response.cert_chain[1] == cert_pem(ROOT.cert).decode()
    leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]
    assert (service.issued, service.refused) == (1, 0)


def test_a_client_certificate_this_ca_issued_names_the_caller_while_valid() -> None:
    req, key = request()
    leaf_pem = decide(ROOT, req, Caller(ID, "token"), timedelta(hours=1), NOW)[0].encode()
    assert certificate_caller(leaf_pem, ROOT, NOW) == Caller(ID, "client certificate")
    assert certificate_caller(leaf_pem, ROOT, NOW + timedelta(hours=2)) is None  # expired
    other = new_root(ca_new_key(), NOW - timedelta(days=1))
    assert certificate_caller(leaf_pem, other, NOW) is None  # another CA's
    assert certificate_caller(b"garbage", ROOT, NOW) is None and certificate_caller(None, ROOT, NOW) is None


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_over_grpc_no_or_a_wrong_token_is_unauthenticated(server: tuple[str, CertificateService],
                                                           token: str | None) -> None:
    address, service = server
    with pytest.raises(grpc.RpcError) as err:
        call(address, request()[0], token=token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert service.refused == 1


def test_a_flood_of_refusals_is_counted_and_logged_once(server: tuple[str, CertificateService],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Anyone who reaches the port can be refused: the count is in `refused`, the log has one line
    per interval, not one per call."""
    address, service = server
    caplog.set_level(logging.WARNING, logger="pilotfish.controlplane")
    req = request()[0]
    for _ in range(20):
        with pytest.raises(grpc.RpcError):
            call(address, req, token="wrong-token")
    assert service.refused == 20
    assert sum("refused a certificate" in r.getMessage() for r in caplog.records) == 1


def test_over_grpc_another_identity_is_permission_denied(server: tuple[str, CertificateService]) -> None:
    address, _ = server
    with pytest.raises(grpc.RpcError) as err:
        call(address, request(spiffe_id("cluster.local", "kube-system", "admin"))[0], token="good-token")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "kube-system" in err.value.details()  # type: ignore[attr-defined]
