"""The start-up checks of the files the agent reads: what makes a root certificate or a token
file unusable, on real files."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pilotfish.agent.files import MISSING, root_cert_problem, saved_table_problem, token_problem
from pilotfish.controlplane.ca import cert_pem, new_key, new_root


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
