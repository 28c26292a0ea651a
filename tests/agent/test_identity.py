"""The identity component against the control plane's certificate service over real TLS gRPC:
the first certificate, its renewal before expiry, OUTPUT_CERTS, the CA away (the certificate in
use stays), and bad settings named."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pilotfish.agent.identity import workload
from pilotfish.agent.identity.caclient import CaClient
from pilotfish.agent.identity.settings import identity_config
from pilotfish.agent.identity.workload import WORKLOAD_CERTIFICATE, Identity
from pilotfish.xds_client.resources import ResourceCache
from pilotfish.common.settings import ConfigError
from pilotfish.controlplane.ca import CertificateAuthority, cert_pem, new_key, new_root, sign_leaf
from pilotfish.xds_client.proto.istio.v1.auth.ca_pb2 import IstioCertificateRequest, IstioCertificateResponse

from ca_harness import ID, Ca, identity
from procs import PILOTFISH, Process

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ca(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Ca]:
    authority = Ca(tmp_path, getattr(request, "param", timedelta(hours=24)))
    yield authority
    authority.stop()


def run_until(component: Identity, done) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(component.serve)
                while not done():
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_first_certificate_is_held_served_from_the_cache_and_written_out(tmp_path: Path, ca: Ca) -> None:
    out = tmp_path / "out"
    component = identity(tmp_path, ca, OUTPUT_CERTS=str(out))
    assert component.ready() == "no workload certificate yet"
    run_until(component, lambda: component.current is not None)
    assert component.ready() is None
    served = component.cache.get(WORKLOAD_CERTIFICATE)
    assert served is not None and served.value is component.current
    leaf = x509.load_pem_x509_certificate(component.current.chain_pem)
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [ID]
    assert (out / "cert-chain.pem").read_bytes() == component.current.chain_pem
    assert (out / "root-cert.pem").read_bytes() == cert_pem(ca.root.cert)
    assert (out / "key.pem").read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert {(p.name, p.stat().st_mode & 0o777) for p in out.iterdir()} == {
        ("key.pem", 0o600), ("cert-chain.pem", 0o600), ("root-cert.pem", 0o600)}
    assert "istio_agent_cert_expiry_seconds" in {m.name for m in component.collect()}


@pytest.mark.parametrize("ca", [timedelta(seconds=2)], indirect=True)
def test_a_short_lived_certificate_is_renewed_with_a_new_key(tmp_path: Path, ca: Ca) -> None:
    """The CA caps the TTL at 2 s (the leaf is backdated 5 min): renewed at about half its life."""
    component = identity(tmp_path, ca)
    seen: list[int] = []
    component.cache.watch(WORKLOAD_CERTIFICATE, lambda issued: seen.append(issued.serial))
    keys: set[bytes] = set()
    component.cache.watch(WORKLOAD_CERTIFICATE, lambda issued: keys.add(issued.key_pem))
    run_until(component, lambda: len(seen) >= 3)
    assert len(set(seen)) == len(seen) and len(keys) == len(seen)
    assert component.renewals >= 2 and component.failures == 0


def test_the_ca_away_keeps_the_certificate_and_counts_failures(tmp_path: Path, ca: Ca) -> None:
    component = identity(tmp_path, ca)
    run_until(component, lambda: component.current is not None)
    held = component.current
    ca.stop()
    run_until(component, lambda: component.failures >= 1)  # serving again: the first attempt fails
    served = component.cache.get(WORKLOAD_CERTIFICATE)
    assert component.current is held and served is not None and served.value is held


def test_a_wrong_token_is_refused_and_nothing_is_held(tmp_path: Path, ca: Ca, caplog: pytest.LogCaptureFixture) -> None:
    component = identity(tmp_path, ca, token="wrong")
    run_until(component, lambda: component.failures >= 1)
    assert component.current is None and component.ready() is not None
    assert "UNAUTHENTICATED" in caplog.text


@pytest.mark.parametrize(("env", "words"), [
    ({"SECRET_TTL": "soon"}, "SECRET_TTL: invalid duration 'soon'"),
    ({"SECRET_TTL": "9999999999999999h"}, "SECRET_TTL: want a duration from 1s to 8784h"),
    ({"SECRET_GRACE_PERIOD_RATIO": "2"}, "SECRET_GRACE_PERIOD_RATIO: '2' is out of range"),
    ({"WORKLOAD_RSA_KEY_SIZE": "big"}, "WORKLOAD_RSA_KEY_SIZE: want a key size in bits up to 8192, got 'big'"),
    ({"WORKLOAD_RSA_KEY_SIZE": "16384"}, "WORKLOAD_RSA_KEY_SIZE: want a key size in bits up to 8192, got '16384'"),
    ({"CA_ROOT_CA": "/nonexistent/root.pem"}, "CA_ROOT_CA: root CA file for the CA does not exist"),
    ({"PROV_CERT": "/etc", "FILE_MOUNTED_CERTS": "true"}, "PROV_CERT and FILE_MOUNTED_CERTS"),
    ({"PKCS8_KEY": "yes"}, "PKCS8_KEY: invalid boolean 'yes'"),
])
def test_bad_settings_are_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        identity_config({"CA_ROOT_CA": "SYSTEM", **env}, "default", "sa", "istiod:15012", "istiod")
    assert words in str(err.value)



def _leaf_for(root: CertificateAuthority, public_key: object, identity: str) -> str:
    leaf = sign_leaf(root, public_key, [x509.UniformResourceIdentifier(identity)],  # type: ignore[arg-type]
                     [ExtendedKeyUsageOID.SERVER_AUTH], datetime.now(UTC), timedelta(hours=1))
    return cert_pem(leaf).decode()


def tamper(bad: str):  # type: ignore[no-untyped-def]
    """Answers the first request as the CA signed it, every later one spoilt as `bad` says."""
    calls = []

    def spoil(root: CertificateAuthority, request: IstioCertificateRequest,
              response: IstioCertificateResponse) -> IstioCertificateResponse:
        calls.append(1)
        if len(calls) == 1:
            return response
        public_key = x509.load_pem_x509_csr(request.csr.encode()).public_key()
        if bad == "one-element":
            del response.cert_chain[1:]
        elif bad == "other-root":
            response.cert_chain[-1] = cert_pem(new_root(new_key(), datetime.now(UTC) - timedelta(days=1)).cert).decode()
        elif bad == "wrong-san":
            response.cert_chain[0] = _leaf_for(root, public_key, ID.replace("productpage", "admin"))
        elif bad == "other-key":
            response.cert_chain[0] = _leaf_for(root, new_key().public_key(), ID)
        return response

    return spoil


@pytest.mark.parametrize("ca", [timedelta(seconds=4)], indirect=True)
def test_the_ca_down_across_a_renewal_then_back(tmp_path: Path, ca: Ca, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA goes down while the certificate is renewed (serving again renews at once): the
    certificate in use keeps serving through the failures; when the CA is back the renewal
    succeeds."""
    monkeypatch.setattr(workload, "failure_delay", lambda failures, draw: 0.2)  # quick retries
    component = identity(tmp_path, ca)
    run_until(component, lambda: component.current is not None)
    held = component.current
    ca.down = True
    run_until(component, lambda: component.failures >= 2)
    assert component.current is held
    ca.down = False
    run_until(component, lambda: component.current is not held)
    assert component.renewals == 1 and component.current is not None and component.current.serial != held.serial


@pytest.mark.parametrize(("bad", "words"), [
    ("one-element", "chain of 1 element"), ("other-root", "no root of the response signed"),
    ("wrong-san", "want spiffe://cluster.local/ns/default/sa/productpage"), ("other-key", "another key"),
])
def test_a_bad_ca_response_is_logged_and_the_certificate_in_use_stays(
        tmp_path: Path, bad: str, words: str, caplog: pytest.LogCaptureFixture) -> None:
    ca = Ca(tmp_path, timedelta(seconds=2), tamper(bad))  # 2 s: the renewal comes at once
    try:
        component = identity(tmp_path, ca)
        run_until(component, lambda: component.failures >= 1)
        assert component.current is not None and component.renewals == 0
        served = component.cache.get(WORKLOAD_CERTIFICATE)
        assert served is not None and served.value is component.current
        assert words in caplog.text  # logged, as "no certificate from the CA", or with little life
        assert "no certificate from the CA" in caplog.text or "renewal keeps failing" in caplog.text  # left
    finally:
        ca.stop()


def test_without_a_token_the_renewal_goes_over_mtls_to_the_control_plane(tmp_path: Path) -> None:
    """Beyond Istio: the token gone (a VM's one-hour bootstrap token expired), the agent renews
    with its current certificate as the client certificate, and `pilotfish controlplane` (whose
    TLS asks for one) issues for the identity that certificate carries."""
    (tmp_path / "mesh.yaml").write_text("services: []\n")
    (tmp_path / "identities").write_text("good-token default/productpage\n")
    root = tmp_path / "root-cert.pem"
    cp = Process([PILOTFISH, "controlplane", "--mesh", str(tmp_path / "mesh.yaml"), "--listen", "127.0.0.1:0",
                  "--state-dir", str(tmp_path / "cp-state"), "--root-cert-out", str(root),
                  "--identities", str(tmp_path / "identities")], tmp_path / "cp.log")
    try:
        port = int(cp.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        token = tmp_path / "istio-token"
        token.write_text("good-token")
        env = {"CA_ADDR": f"localhost:{port}", "CA_ROOT_CA": str(root), "ECC_SIGNATURE_ALGORITHM": "ECDSA"}
        config = identity_config(env, "default", "productpage", "istiod.istio-system.svc:15012",
                                 "istiod.istio-system.svc")
        component = Identity(config, CaClient(config, "Kubernetes", str(token)), ResourceCache())
        run_until(component, lambda: component.current is not None)
        first = component.current
        token.unlink()
        run_until(component, lambda: component.current is not first)  # serving again renews at once
        assert component.current is not None and component.failures == 0
        cp.wait_for(r"issued a certificate for spiffe://cluster\.local/ns/default/sa/productpage "
                    r"\(client certificate\)")
        # PROV_CERT's certificate, as a VM's provisioned one, is presented before anything else
        prov = tmp_path / "prov"
        prov.mkdir()
        assert component.current is not None
        (prov / "key.pem").write_bytes(component.current.key_pem)
        (prov / "cert-chain.pem").write_bytes(component.current.chain_pem)
        with_prov = identity_config({**env, "PROV_CERT": str(prov)}, "default", "productpage",
                                    "istiod.istio-system.svc:15012", "istiod.istio-system.svc")
        vm = Identity(with_prov, CaClient(with_prov, "Kubernetes", str(token)), ResourceCache())
        run_until(vm, lambda: vm.current is not None)
        assert cp.text().count("(client certificate)") == 2
    finally:
        cp.stop()
