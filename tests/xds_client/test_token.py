"""The agent's bearer-token reader: a bad token file must cost a refused stream, not the agent."""
from __future__ import annotations

from pathlib import Path

from pilotfish.xds_client.transport import read_token


def test_token_is_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "istio-token"
    path.write_text("  abc.def.ghi\n")
    assert read_token(str(path)) == "abc.def.ghi"


def test_missing_token_file_reads_as_no_token(tmp_path: Path) -> None:
    assert read_token(str(tmp_path / "absent")) == ""


def test_non_utf8_token_file_reads_as_no_token(tmp_path: Path) -> None:
    path = tmp_path / "istio-token"
    path.write_bytes(b"\xff\xfe\x00token")
    assert read_token(str(path)) == ""
