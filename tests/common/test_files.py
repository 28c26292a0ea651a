"""read_regular_file: whatever a setting names, the read neither blocks nor runs away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pilotfish.common.files import UnreadableFile, read_regular_file


def test_reads_a_regular_file_up_to_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular_file(str(path), 100) == b"x" * 100
    with pytest.raises(UnreadableFile, match="^is larger than 99 bytes$"):
        read_regular_file(str(path), 99)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFile, match="^is not a regular file$"):
        read_regular_file(str(fifo), 1 << 20)


@pytest.mark.parametrize("path,why", [("/dev/zero", "is not a regular file"), ("/", "is a directory"),
                                      ("/nonexistent/x", "No such file or directory")])
def test_other_non_files(path: str, why: str) -> None:
    with pytest.raises(UnreadableFile, match=f"^{why}$"):
        read_regular_file(path, 1 << 20)


def test_the_bound_is_named_in_units(tmp_path: Path) -> None:
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate((1 << 20) + 1)
    with pytest.raises(UnreadableFile, match="^is larger than 1 MiB$"):
        read_regular_file(str(path), 1 << 20)
