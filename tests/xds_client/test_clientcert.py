"""The client certificate the agent presents to the control plane (xds_client/clientcert.py):
only a readable, valid pair whose key goes with the certificate; anything else is left out with
the reason, and the token alone is sent (as Istio does for an unparsable or expired one)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from pilotfish.agent.config import xds_client_cert
from pilotfish.controlplane.ca import cert_pem, key_pem, new_key, new_root, sign_leaf
from pilotfish.controlplane.casvc import WORKLOAD_USAGES
from pilotfish.xds_client.clientcert import client_certificate

NOW = datetime.now(UTC)
CA = new_root(new_key(), NOW - timedelta(days=1))
NAME = [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/vmns/sa/vm")]


def pair(tmp_path: Path, not_before: datetime = NOW, key_of_another: bool = False) -> tuple[str, str]:
    key = new_key()
    leaf = sign_leaf(CA, key.public_key(), NAME, WORKLOAD_USAGES, not_before, timedelta(hours=24))
    (tmp_path / "key.pem").write_bytes(key_pem(new_key() if key_of_another else key))
    (tmp_path / "cert-chain.pem").write_bytes(cert_pem(leaf) + cert_pem(CA.cert))
    return str(tmp_path / "key.pem"), str(tmp_path / "cert-chain.pem")


def test_a_valid_pair_is_presented(tmp_path: Path) -> None:
    key, chain = pair(tmp_path)
    assert client_certificate(key, chain, NOW) == (Path(key).read_bytes(), Path(chain).read_bytes())


def test_what_cannot_be_presented_says_why(tmp_path: Path) -> None:
    (tmp_path / "expired").mkdir()
    key, chain = pair(tmp_path / "expired", not_before=NOW - timedelta(days=3))
    assert "not valid now" in str(client_certificate(key, chain, NOW))
    (tmp_path / "other").mkdir()
    key, chain = pair(tmp_path / "other", key_of_another=True)
    assert "the certificate is not" in str(client_certificate(key, chain, NOW))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/key.pem").write_text("junk\n")
    (tmp_path / "junk/cert-chain.pem").write_text("junk\n")
    assert isinstance(client_certificate(str(tmp_path / "junk/key.pem"), str(tmp_path / "junk/cert-chain.pem"), NOW),
                      str)
    missing = client_certificate(str(tmp_path / "none/key.pem"), str(tmp_path / "none/cert-chain.pem"), NOW)
    assert "No such file" in str(missing)
    (tmp_path / "big").mkdir()
    (tmp_path / "big/key.pem").write_bytes(b"x" * (2 << 20))
    (tmp_path / "big/cert-chain.pem").write_bytes(b"x")
    assert "larger than" in str(client_certificate(str(tmp_path / "big/key.pem"), str(tmp_path / "big/cert-chain.pem"),
                                                   NOW))


def test_the_files_are_istios_for_xds() -> None:
    """GetKeyCertsForXDS: PROV_CERT's pair, else FILE_MOUNTED_CERTS' client certificate, none
    with controlPlaneAuthPolicy NONE."""
    assert xds_client_cert({"PROV_CERT": "./etc/certs"}, {}) == ("./etc/certs/key.pem", "./etc/certs/cert-chain.pem")
    mounted = {"FILE_MOUNTED_CERTS": "true", "ISTIO_META_TLS_CLIENT_KEY": "/c/key.pem",
               "ISTIO_META_TLS_CLIENT_CERT_CHAIN": "/c/chain.pem"}
    assert xds_client_cert(mounted, {}) == ("/c/key.pem", "/c/chain.pem")
    assert xds_client_cert({"PROV_CERT": "./etc/certs"}, {"controlPlaneAuthPolicy": "NONE"}) == ("", "")
    assert xds_client_cert({}, {}) == ("", "")
