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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes a symlink owned by another user (lchown)")
def test_check_private_path_refuses_a_symlink_another_user_owns(tmp_path: Path) -> None:
    """A state dir reached through another user's symlink passed (os.stat followed it), and the
    link could be re-pointed at a planted root CA between the check and the read."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = sticky / "pf-state"
    link.symlink_to(private)
    os.lchown(link, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match=r"pf-state is a symlink owned by uid 65534"):
        check_private_path(str(link))
    os.lchown(link, 0, 0)
    check_private_path(str(link))  # our own link to a private directory is fine


def test_check_private_path_checks_where_a_symlink_leads(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    (open_dir / "state").mkdir(mode=0o700)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "state").symlink_to(open_dir / "state")
    with pytest.raises(UnsafeDirectoryError, match="open is writable by others"):
        check_private_path(str(private / "state"))
