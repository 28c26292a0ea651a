"""Directories created with the mode we mean, whatever the umask, and refused when another user
could replace them.

`os.makedirs(path, mode)` applies `mode` only to the leaf and filters it through the umask; the
parents get `0o777 & ~umask`, which is 0777 under `umask 000` (some container runtimes and
init systems run with it). A world-writable parent lets any local user rename our private
directory away and put their own in its place: a planted root CA for the control plane, a
planted name table for the agent. So every directory we create gets an explicit `chmod`, and a
directory that holds secrets is refused when a parent is writable by others (without the sticky
bit, which is what makes /tmp safe to sit under).
"""

from __future__ import annotations

import os
import stat


class UnsafeDirectoryError(OSError):
    """A directory (or one of its parents) can be replaced by another user."""


def make_dirs(path: str, mode: int = 0o700) -> None:
    """Create `path` and each missing parent with exactly `mode` (not filtered by the umask).

    Directories that exist already are left as they are: they were not ours to set.
    """
    path = os.path.abspath(path)
    missing: list[str] = []
    current = path
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # created by someone else meanwhile: not ours to chmod
        os.chmod(directory, mode)


def check_private_path(path: str) -> None:
    """Raise UnsafeDirectoryError when `path` or a parent is writable by group or others and not
    sticky, or is owned by a user other than us or root: such a directory can be swapped. Both
    the path as written and the path it resolves to are checked, and a symlink on the way counts
    by its own owner: a link owned by another user can be re-pointed (at a directory holding a
    planted root CA) between this check and the read."""
    for start in (os.path.abspath(path), os.path.realpath(path)):
        _check_chain(start)


def _check_chain(current: str) -> None:
    uid = os.geteuid()
    while True:
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_uid not in (uid, 0):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else ""
                raise UnsafeDirectoryError(
                    f"{current} is {kind + ' ' if kind else ''}owned by uid {st.st_uid}, not by us or root"
                )
            if (not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                    and not st.st_mode & stat.S_ISVTX):
                raise UnsafeDirectoryError(
                    f"{current} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
                )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent
