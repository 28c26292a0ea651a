"""The agent's bearer-token reader: a bad token file must cost a refused stream, not the agent."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from pilotfish.xds_client.channel import read_token


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


def test_a_fifo_reads_as_no_token_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: the stream thread would wait forever."""
    fifo = tmp_path / "istio-token"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(read_token(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # let the stuck reader go before failing
        with open(fifo, "w"):
            pass
    assert got == [""]
