"""Directories we create get our mode under any umask; unsafe parents are refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pilotfish.common.dirs import UnsafeDirectoryError, check_private_path, make_dirs


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_dirs_sets_mode_on_every_created_parent_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_dirs(str(tmp_path / "a" / "b" / "state"), 0o700)
    finally:
        os.umask(old)
    for p in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "state"):
        assert _mode(p) == 0o700, p


def test_make_dirs_leaves_existing_directories_alone(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(mode=0o755)
    os.chmod(tmp_path / "a", 0o755)
    make_dirs(str(tmp_path / "a" / "b"), 0o700)
    assert _mode(tmp_path / "a") == 0o755
    assert _mode(tmp_path / "a" / "b") == 0o700
    make_dirs(str(tmp_path / "a" / "b"), 0o700)  # exists: no error


def test_check_private_path_refuses_a_world_writable_parent(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(UnsafeDirectoryError, match="writable by others"):
        check_private_path(str(parent / "state"))


def test_check_private_path_accepts_sticky_and_private_parents(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    private = sticky / "state"
    private.mkdir(mode=0o700)
    check_private_path(str(private))
    check_private_path(str(private / "not-yet"))
