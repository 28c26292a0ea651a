"""Reading a file named by a setting, which may turn out to be anything.

`open()` on a FIFO blocks until something writes to it, a character device such as /dev/zero
never ends, a directory fails only at the read, and a file of gigabytes is read whole into memory.
`open_regular_file` opens without blocking and checks what it opened (not what the path was a
moment before); `read_regular_file` also reads at most a bound. Each of those cases is then an
error the caller can name at start.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO


class UnreadableFile(ValueError):
    """The path is not a regular file of at most the bound; the message says why (without the
    path: the caller names the setting and the path). `missing` when there is nothing there, which
    some callers accept (a token kubelet writes later)."""

    def __init__(self, reason: str, missing: bool = False) -> None:
        super().__init__(reason)
        self.missing = missing


def open_regular_file(path: str, follow: bool = True) -> BinaryIO:
    """`path` opened for reading, if it is a regular file (checked on what was opened, so a FIFO
    put there in the meantime cannot block us), or UnreadableFile. Without `follow`, a symbolic
    link is refused, not followed (a file someone else gave, read as root)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if not follow and err.errno == errno.ELOOP and os.path.islink(path):
            raise UnreadableFile(f"is a symbolic link (to {os.readlink(path)}), not the file itself") from None
        raise UnreadableFile(err.strerror or str(err), missing=isinstance(err, FileNotFoundError)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableFile("is a directory")
        if not stat.S_ISREG(mode):
            raise UnreadableFile("is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str, limit: int, follow: bool = True) -> bytes:
    """The contents of `path`, a regular file of at most `limit` bytes, or UnreadableFile."""
    with open_regular_file(path, follow) as f:
        try:
            data = f.read(limit + 1)  # the size may change between a stat and the read
        except OSError as err:
            raise UnreadableFile(err.strerror or str(err)) from None
    if len(data) > limit:
        raise UnreadableFile(too_large(limit))
    return data


def too_large(limit: int) -> str:
    """The fault of a file over `limit` bytes."""
    return f"is larger than {_size(limit)}"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"

