"""Certificates from mounted files: which files are chosen (Istio's order), served as the
workload certificate, read again when they change (a Kubernetes Secret's `..data` symlink swap
included), a file set that does not load keeps the one in use."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from ca_harness import write_mounted_certs

from pilotfish.agent.identity import mounted
from pilotfish.agent.identity.mounted import MountedCertificate, MountedFiles, mounted_files
from pilotfish.agent.identity.workload import WORKLOAD_CERTIFICATE
from pilotfish.common.settings import ConfigError
from pilotfish.xds_client.resources import ResourceCache

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_istios_order(in_tmp: Path) -> None:
    assert mounted_files({}, {}) is None  # nothing mounted: the CA
    write_mounted_certs(in_tmp / "etc/certs")
    assert mounted_files({}, {}) == MountedFiles("./etc/certs/cert-chain.pem", "./etc/certs/key.pem",
                                                 "./etc/certs/root-cert.pem", "files in ./etc/certs")
    assert mounted_files({"OUTPUT_CERTS": "./etc/certs/"}, {}) is None  # our own output is never read back
    write_mounted_certs(in_tmp / "var/run/secrets/workload-spiffe-credentials")
    chosen = mounted_files({}, {})
    assert chosen is not None and chosen.why.startswith("workload identity files")


def test_file_mounted_certs_take_the_paths_from_proxy_metadata(in_tmp: Path) -> None:
    metadata = {"ISTIO_META_TLS_CLIENT_CERT_CHAIN": "/c.pem", "ISTIO_META_TLS_CLIENT_KEY": "/k.pem",
                "ISTIO_META_TLS_CLIENT_ROOT_CERT": "/r.pem"}
    assert mounted_files({"FILE_MOUNTED_CERTS": "true"}, metadata) == MountedFiles(
        "/c.pem", "/k.pem", "/r.pem", "FILE_MOUNTED_CERTS")
    with pytest.raises(ConfigError, match="ISTIO_META_TLS_CLIENT_KEY not set"):
        mounted_files({"FILE_MOUNTED_CERTS": "true"}, {k: v for k, v in metadata.items() if "KEY" not in k})
    with pytest.raises(ConfigError, match="FILE_MOUNTED_CERTS: invalid boolean"):
        mounted_files({"FILE_MOUNTED_CERTS": "yes"}, {})


def test_served_and_read_again_on_a_symlink_swap_and_a_bad_set_keeps_the_old(
        in_tmp: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As kubelet updates a Secret volume: the files are symlinks into `..data`, itself a symlink
    to a timestamped directory, swapped atomically."""
    monkeypatch.setattr(mounted, "POLL", 0.05)
    volume = in_tmp / "secret"
    first, second, broken = volume / "..2026_01", volume / "..2026_02", volume / "..2026_03"
    for directory in (first, second):
        write_mounted_certs(directory)
    broken.mkdir(parents=True)
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        (broken / name).write_text("not a certificate\n")
    os.symlink(first.name, volume / "..data")
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        os.symlink(f"..data/{name}", volume / name)
    files = MountedFiles(str(volume / "cert-chain.pem"), str(volume / "key.pem"), str(volume / "root-cert.pem"), "test")
    cache = ResourceCache()
    served: list[int] = []
    cache.watch(WORKLOAD_CERTIFICATE, lambda issued: served.append(issued.serial))
    component = MountedCertificate(files, cache)

    def swap_to(target: Path) -> None:
        os.symlink(target.name, volume / "..data_tmp")
        os.replace(volume / "..data_tmp", volume / "..data")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(component.serve)
            assert component.ready() is None and len(served) == 1
            swap_to(second)
            with trio.fail_after(10):
                while len(served) < 2:
                    await trio.sleep(0.01)
            held = component.current
            swap_to(broken)
            with trio.fail_after(10):
                while "do not load" not in caplog.text:  # seen, and refused
                    await trio.sleep(0.01)
            assert component.current is held and len(served) == 2
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert served[0] != served[1]


def test_a_key_that_is_not_the_certificates_or_an_expired_certificate_does_not_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret rewritten file by file (the chain first) must not reach Envoy as a mismatched
    pair: it does not load until both are there (hostile review)."""
    write_mounted_certs(tmp_path / "a")
    write_mounted_certs(tmp_path / "b")
    files = MountedFiles(str(tmp_path / "a/cert-chain.pem"), str(tmp_path / "b/key.pem"), str(tmp_path / "a/root-cert.pem"),
                         "test")
    with pytest.raises(ValueError, match="is not the key of the certificate"):
        mounted.load(files)
    good = MountedFiles(str(tmp_path / "a/cert-chain.pem"), str(tmp_path / "a/key.pem"), files.root, "test")
    assert mounted.load(good).key_pem == (tmp_path / "a/key.pem").read_bytes()
    real = mounted.datetime

    class TwoDaysLater(real):  # type: ignore[misc, valid-type]
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            return real.now(tz) + timedelta(days=2)

    monkeypatch.setattr(mounted, "datetime", TwoDaysLater)  # the clock the loader reads
    with pytest.raises(ValueError, match="is not valid now"):
        mounted.load(good)
