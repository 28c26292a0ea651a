"""The last good resource on disk, so that an agent restarted while the control plane is away
serves what it had (Istio's agent starts empty and answers SERVFAIL until istiod is back).

Written to a temp file in the same directory and renamed over the old one (never a half-written
file), mode 0600 by default (the table lists every service and address in the mesh).
"""

from __future__ import annotations

import os
import tempfile


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a part. Missing directories are created,
    private unless the file itself is readable by others (a root certificate, 0644)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755 if mode & 0o044 else 0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read(path: str) -> bytes | None:
    """The saved bytes, or None when there are none (or they cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
