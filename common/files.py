"""Reading a file named by a setting, which may turn out to be anything.

`open()` on a FIFO blocks until something writes to it, a character device such as /dev/zero
never ends, a directory fails only at the read, and a file of gigabytes is read whole into memory.
`read_regular_file` opens without blocking, checks what it opened (not what the path was a moment
before), and reads at most a bound, so each of those is an error the caller can name at start.
"""

from __future__ import annotations

import os
import stat


class UnreadableFile(ValueError):
    """The path is not a regular file of at most the bound; the message says why (without the
    path: the caller names the setting and the path)."""


def read_regular_file(path: str, limit: int) -> bytes:
    """The contents of `path`, a regular file of at most `limit` bytes, or UnreadableFile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise UnreadableFile(err.strerror or str(err)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableFile("is a directory")
        if not stat.S_ISREG(mode):
            raise UnreadableFile("is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # the size may change between a stat and the read
    except OSError as err:
        raise UnreadableFile(err.strerror or str(err)) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UnreadableFile(f"is larger than {_size(limit)}")
    return data


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"
