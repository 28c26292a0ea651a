"""One `pilotfish init` at a time per network namespace.

A run reads the tables, decides, commits and, if something fails, restores what it read. Two runs
at once in one namespace both read the tables before either commits; the second then fails on a
chain the first created and "restores" the tables it read, deleting the first run's rules while
the first reports success (issue 7, item 7). So a run holds a lock from before it reads the tables
until it has committed, or rolled back, everything.

The lock is `flock` on `/run/pilotfish/init-netns-<dev>-<inode>.lock`, named by the device and
inode of `/proc/self/ns/net`: every process in one network namespace sees the same pair there,
another namespace has another inode (the kernel documents the (dev, inode) pair as a namespace's
identity). The directory is root's, mode 0700, so another local user (on a VM, the namespace is
the host's) cannot hold the lock to keep capture from being installed. Two runs in one namespace
share the lock when they share /run: the same container, or the host. Where /run cannot be written
(a read-only root file system), the lock is the namespace's own inode, `/proc/self/ns/net`, which
is the same for every process in the namespace whatever its mount namespace; Istio's CNI plugin
uses the same object (the netns file) as its xtables lock file in cni-mode. Any process in the
namespace can open that one, which is why it is only the fallback.

A waiting run gives up after 30 s (istio-iptables' `--wait=30` for the xtables lock) and exits 1
naming the holder's pid, without having touched anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator

from pilotfish.common.dirs import check_private_path, make_dirs

log = logging.getLogger("pilotfish.init")

LOCK_DIR = "/run/pilotfish"
NETNS = "/proc/self/ns/net"
LOCK_WAIT = 30.0  # seconds, as istio-iptables' --wait=30
POLL = 0.05


class LockError(RuntimeError):
    """The lock stayed busy for the whole wait; the message names the holder when it is known."""


def netns_lock_path(directory: str = LOCK_DIR) -> str:
    """The lock file of the current network namespace."""
    st = os.stat(NETNS)
    return os.path.join(directory, f"init-netns-{st.st_dev}-{st.st_ino}.lock")


@contextlib.contextmanager
def namespace_lock(directory: str = LOCK_DIR, wait: float = LOCK_WAIT) -> Iterator[str]:
    """Hold this network namespace's init lock; yields what was locked (for the log)."""
    path = netns_lock_path(directory)
    while True:
        try:
            make_dirs(directory, 0o700)
            check_private_path(directory)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            log.info("init: cannot use %s (%s); locking the network namespace itself (%s)", path, err, NETNS)
            path = ""
            fd = os.open(NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            flock_wait(fd, path or NETNS, wait)
        except BaseException:
            os.close(fd)
            raise
        if not path or _same_file(fd, path):
            break
        os.close(fd)  # the holder we waited for removed the file: lock the one that is there now
    try:
        yield path or NETNS
    finally:
        if path:  # removed while still held, so a waiter finds it gone and starts over
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def flock_wait(fd: int, what: str, wait: float) -> None:
    """Take an exclusive flock on `fd` within `wait` seconds (polled, so the wait is bounded and
    a waiter can say once whom it waits for); LockError naming the holder otherwise."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockError(f"{what} is still held{holder(fd)} after {wait:.0f}s") from None
            if not said:
                log.info("init: waiting for %s, held%s (another pilotfish init in this network namespace?)",
                         what, holder(fd))
                said = True
            time.sleep(POLL)


def holder(fd: int) -> str:
    """` by pid N (command)` for the process holding a flock on `fd`'s file, from /proc/locks."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = [line.split() for line in f if "FLOCK" in line and "->" not in line]
    except OSError:
        return ""
    for fields in lines:
        if len(fields) >= 6 and fields[5] == key and fields[4].isdigit() and fields[4] != "0":
            pid = fields[4]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                command = ""
            return f" by pid {pid}" + (f" ({command[:120]})" if command else "")
    return ""
