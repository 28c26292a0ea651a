"""SDS: the stream rules (Istio's, as vectors on the pure core) and the server on a real unix
socket: secrets from the workload certificate, pushes on rotation only to the streams watching,
an ACK never answered, a stream asking before the first certificate answered when it comes,
the socket private, a healthy socket of someone else left alone."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc
from pilotfish.agent.identity import sds as sds_module
from pilotfish.agent.identity.sds import SdsService, SecretStore, start_sds
from pilotfish.agent.identity.sdscore import SECRET_TYPE, SdsStream, StreamEnd
from pilotfish.agent.identity.workload import WORKLOAD_CERTIFICATE
from pilotfish.controlplane.ca import cert_pem, new_key, new_root
from pilotfish.xds_client.resources import ResourceCache
from sds_client import NOW, ROOT, Client, issued, req, secrets

pytestmark = pytest.mark.timeout(30)


def test_the_first_request_must_name_the_node() -> None:
    with pytest.raises(StreamEnd) as end:
        SdsStream().on_request(req("default"))
    assert (end.value.code, str(end.value)) == ("INVALID_ARGUMENT", "missing node information")


def test_stream_rules() -> None:
    s = SdsStream()
    assert s.on_request(req("default", node=True)) == ["default"]  # subscribe: everything
    s.sent("n1")
    assert s.on_request(req("default", nonce="n1")) == [] and s.acks == 1  # an ACK is never answered
    assert s.on_request(req("default", nonce="old")) == []  # stale
    assert s.on_request(req("default", "ROOTCA", nonce="n1")) == ["ROOTCA"]  # grew: only the new name
    s.sent("n2")
    assert s.on_request(req("ROOTCA", nonce="n2")) == []  # shrank: nothing
    assert s.on_change(["default", "ROOTCA"]) == ["ROOTCA"]  # pushes go to watchers only
    assert s.on_request(req("ROOTCA", nonce="n2", error=True)) == [] and s.nacks == 1
    assert s.on_request(req("default")) == ["default"]  # no nonce: a resubscription
    assert s.on_request(req()) == [] and s.on_change(["default"]) == []  # unsubscribed


def test_too_many_names_end_the_stream() -> None:
    with pytest.raises(StreamEnd):
        SdsStream().on_request(req(*[f"file-root:/x{i}" for i in range(65)], node=True))


@pytest.fixture
def sds(tmp_path: Path) -> Iterator[tuple[str, ResourceCache, SdsService]]:
    cache = ResourceCache()
    service = SdsService(SecretStore(cache, str(tmp_path / "no-crl.pem")))
    path = str(tmp_path / "uds" / "socket")
    server = start_sds(service, path)
    assert server is not None
    yield path, cache, service
    server.stop(None)


def test_a_stream_asking_before_the_certificate_is_answered_when_it_comes(sds: tuple[str, ResourceCache, SdsService]) -> None:
    path, cache, _ = sds
    client = Client(path)
    try:
        client.send(req("default", node=True))
        assert client.nothing_within(0.2)  # no certificate yet: no empty answer
        first = issued()
        cache.swap(WORKLOAD_CERTIFICATE.type_url, "1", first)
        response = client.receive()
        got = secrets(response)["default"].tls_certificate
        assert got.certificate_chain.inline_bytes == first.chain_pem and got.private_key.inline_bytes == first.key_pem
        assert response.type_url == SECRET_TYPE and "/" in response.version_info
    finally:
        client.close()


def test_rotation_pushes_default_to_its_watchers_and_not_rootca(sds: tuple[str, ResourceCache, SdsService]) -> None:
    path, cache, service = sds
    cache.swap(WORKLOAD_CERTIFICATE.type_url, "1", issued())
    default, roots = Client(path), Client(path)
    try:
        default.send(req("default", node=True))
        roots.send(req("ROOTCA", node=True))
        d1, r1 = default.receive(), roots.receive()
        assert secrets(r1)["ROOTCA"].validation_context.trusted_ca.inline_bytes == cert_pem(ROOT.cert)
        default.send(req("default", nonce=d1.nonce))  # ACKs: never answered
        roots.send(req("ROOTCA", nonce=r1.nonce))
        second = issued()
        cache.swap(WORKLOAD_CERTIFICATE.type_url, "2", second)  # same root
        d2 = default.receive()
        assert secrets(d2)["default"].tls_certificate.certificate_chain.inline_bytes == second.chain_pem
        assert roots.nothing_within(0.3) and default.nothing_within(0.1)
        other_root = new_root(new_key(), NOW - timedelta(days=1))
        cache.swap(WORKLOAD_CERTIFICATE.type_url, "3", issued(other_root))  # a new root: ROOTCA too
        assert secrets(roots.receive())["ROOTCA"].validation_context.trusted_ca.inline_bytes == cert_pem(other_root.cert)
    finally:
        default.close()
        roots.close()


def test_no_node_and_unknown_names_end_the_stream(sds: tuple[str, ResourceCache, SdsService]) -> None:
    path, cache, _ = sds
    cache.swap(WORKLOAD_CERTIFICATE.type_url, "1", issued())
    for request, code in ((req("default"), grpc.StatusCode.INVALID_ARGUMENT),
                          (req("nonsense", node=True), grpc.StatusCode.NOT_FOUND),
                          (req("file-root:/nonexistent/ca.pem", node=True), grpc.StatusCode.NOT_FOUND)):
        client = Client(path)
        try:
            client.send(request)
            with pytest.raises(grpc.RpcError) as err:
                client.receive()
            assert err.value.code() == code  # type: ignore[attr-defined]
        finally:
            client.close()


def test_file_secrets_are_read_from_their_files(sds: tuple[str, ResourceCache, SdsService], tmp_path: Path) -> None:
    path, _, _ = sds
    cert = issued()
    (tmp_path / "c.pem").write_bytes(cert.chain_pem)
    (tmp_path / "k.pem").write_bytes(cert.key_pem)
    client = Client(path)
    try:
        client.send(req(f"file-cert:{tmp_path}/c.pem~{tmp_path}/k.pem", f"file-root:{tmp_path}/c.pem", node=True))
        got = secrets(client.receive())
        assert got[f"file-cert:{tmp_path}/c.pem~{tmp_path}/k.pem"].tls_certificate.private_key.inline_bytes == cert.key_pem
        assert got[f"file-root:{tmp_path}/c.pem"].validation_context.trusted_ca.inline_bytes == cert.chain_pem
    finally:
        client.close()


def test_the_socket_is_private(sds: tuple[str, ResourceCache, SdsService]) -> None:
    path, _, _ = sds
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


def test_a_healthy_socket_of_someone_else_is_left_alone_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    with socket.socket(socket.AF_UNIX) as spire:
        spire.bind(path)
        spire.listen()
        assert start_sds(SdsService(SecretStore(ResourceCache())), path) is None
        assert os.path.exists(path)
    # closed, the file is left behind: a stale socket, replaced
    server = start_sds(SdsService(SecretStore(ResourceCache())), path)
    assert server is not None
    server.stop(None)


def test_a_file_secret_is_pushed_again_when_its_file_changes(sds: tuple[str, ResourceCache, SdsService],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sds_module, "FILE_POLL", 0.05)
    path, _, _ = sds
    root = tmp_path / "ca.pem"
    root.write_bytes(cert_pem(ROOT.cert))
    client = Client(path)
    try:
        client.send(req(f"file-root:{root}", node=True))
        first = client.receive()
        client.send(req(f"file-root:{root}", nonce=first.nonce))  # the ACK: not answered
        other = new_root(new_key(), NOW - timedelta(days=1))
        replacement = tmp_path / "ca.pem.new"
        replacement.write_bytes(cert_pem(other.cert))
        os.replace(replacement, root)  # as a Secret volume or cert-manager replaces it
        pushed = secrets(client.receive())[f"file-root:{root}"]
        assert pushed.validation_context.trusted_ca.inline_bytes == cert_pem(other.cert)
    finally:
        client.close()


def test_fetch_secrets_answers_once_and_unavailable_before_a_certificate(sds: tuple[str, ResourceCache, SdsService]) -> None:
    path, cache, _ = sds
    with grpc.insecure_channel(f"unix:{path}") as channel:
        fetch = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets
        with pytest.raises(grpc.RpcError) as err:
            fetch(req("default", node=True), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        cert = issued()
        cache.swap(WORKLOAD_CERTIFICATE.type_url, "1", cert)
        got = secrets(fetch(req("default", "ROOTCA", node=True), timeout=5))
        assert got["default"].tls_certificate.certificate_chain.inline_bytes == cert.chain_pem
        assert got["ROOTCA"].validation_context.trusted_ca.inline_bytes == cert_pem(ROOT.cert)


def test_file_watch_forgets_names_no_longer_watched(tmp_path: Path) -> None:
    """A stream re-subscribing under ever new names grew this by 0.15 MB a request (hostile
    review): names no longer watched are forgotten at each response."""
    (tmp_path / "r.pem").write_text("x")
    files = sds_module.FileWatch()
    for i in range(100):
        name = f"file-root:{tmp_path}/{'./' * i}r.pem"
        files.sent([name], frozenset([name]))
    assert len(files._seen) == 1


def test_a_stream_that_asks_nothing_is_closed(sds: tuple[str, ResourceCache, SdsService],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """256 idle streams took every slot and Envoy got RESOURCE_EXHAUSTED (hostile review)."""
    monkeypatch.setattr(sds_module, "FIRST_REQUEST", 0.2)
    path, _, _ = sds
    client = Client(path)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.receive()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    finally:
        client.close()
