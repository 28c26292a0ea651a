"""Files written whole or not at all: the agent's last good resource (so that an agent restarted
while the control plane is away serves what it had), the control plane's root CA, `init`'s
dry-run output.

Written to a temp file in the same directory, fsynced and renamed over the old one (never a
half-written file), mode 0600 by default (the saved table lists every service and address in
the mesh). A save killed between the two (SIGKILL, the OOM killer during a large update) leaves
its temp file, a full-size copy; `remove_stale_temps` at start removes those, and only those.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile

from .dirs import make_dirs


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Readers see the old file or the new one, never a part. Missing directories are created,
    private unless the file itself is readable by others (a root certificate, 0644)."""
    directory = os.path.dirname(os.path.abspath(path))
    make_dirs(directory, 0o755 if mode & 0o044 else 0o700)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=directory)
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


def remove_stale_temps(path: str) -> int:
    """Remove the temp files that interrupted saves of `path` left; return how many.

    Only ours: regular files in `path`'s directory, owned by us, named as `write_atomic` names
    them (`.<name>.` and mkstemp's 8 random characters). Call it before any save of `path` can
    run (at start), or it could remove the temp file of a save in progress.
    """
    directory = os.path.dirname(os.path.abspath(path))
    ours = re.compile(re.escape(_temp_prefix(path)) + r"[a-z0-9_]{8}")
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not ours.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed
