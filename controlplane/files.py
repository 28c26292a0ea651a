"""Reading and placing the files the control plane's flags name, with the reason in the error.

A flag's path is checked before anything is written, so a mistake is `--root-cert-out certs:
is a directory, not a file` at start, not a failure naming a temp file after the root CA was
made, and a FIFO given by mistake is refused instead of blocking the start (or a reload) on a
read that never ends.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_regular_file(path: str | Path) -> bytes:
    """The content of a regular file (a symlink to one is fine, as Kubernetes mounts them).
    OSError with a strerror otherwise: a directory, a FIFO or a device is refused, not read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


def check_output_path(path: str, directory: bool) -> str | None:
    """Why `path` cannot become a `directory` we create (or use), or a file we write by renaming
    a temp file over it; None if it can. Only what the file system says now: permissions show
    when writing (and root passes them)."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if directory and not os.path.isdir(full):
            return "not a directory"
        if not directory and os.path.isdir(full):
            return "is a directory, not a file"
        return None
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"{parent} is not a directory"
