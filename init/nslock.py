"""One `pilotfish init` at a time per network namespace.

A run reads the tables, decides, commits and, if something fails, restores what it read. Two runs
at once in one namespace both read the tables before either commits; the second then fails on a
chain the first created and "restores" the tables it read, deleting the first run's rules while
the first reports success (issue 7, item 7). So a run holds a lock from before it reads the tables
until it has committed, or rolled back, everything.

The lock is `flock` on the network namespace itself, `/proc/self/ns/net`: one nsfs inode per
namespace, the same for every process in it whatever its mount namespace, container or view of
/proc (a lock file under /run would not be: /run belongs to the mount namespace, so two
containers of one pod, or a node-side `nsenter` run beside the init container, would each lock
their own file; Istio's CNI plugin locks the same netns file, as its xtables lock). Any process in
the namespace can open that file and hold the lock, so a holder is waited for only while it could
be changing the tables: a holder that is known and lacks CAP_NET_ADMIN cannot, and is ignored (a
local user on a VM cannot keep capture from being installed). A holder this process cannot see
(another PID namespace: /proc/locks then shows pid 0) is waited for.

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

log = logging.getLogger("pilotfish.init")

NETNS = "/proc/self/ns/net"
LOCK_WAIT = 30.0  # seconds, as istio-iptables' --wait=30
POLL = 0.05
CAP_NET_ADMIN = 12  # linux/capability.h


class LockError(RuntimeError):
    """The lock stayed busy for the whole wait; the message names the holder when it is known."""


@contextlib.contextmanager
def namespace_lock(wait: float = LOCK_WAIT, netns: str = NETNS) -> Iterator[str]:
    """Hold this network namespace's init lock; yields what was locked (for the log)."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if flock_wait(fd, netns, wait, only_capable=True):
            yield netns
        else:
            yield f"nothing: {netns} is held{holder(fd)}, which cannot change iptables rules"
    finally:
        os.close(fd)  # releases the flock


def flock_wait(fd: int, what: str, wait: float, *, only_capable: bool = False) -> bool:
    """Take an exclusive flock on `fd` within `wait` seconds (polled, so the wait is bounded and
    a waiter can say once whom it waits for); LockError naming the holder otherwise.

    With `only_capable`, returns False without the lock when every holder is known and lacks
    CAP_NET_ADMIN (see the module docstring); True once locked."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pids = holders(fd)
            if only_capable and pids and not any(_can_admin_net(pid) for pid in pids):
                log.warning("init: %s is held%s, which lacks CAP_NET_ADMIN; not waiting for it", what, holder(fd))
                return False
            if time.monotonic() >= deadline:
                raise LockError(f"{what} is still held{holder(fd)} after {wait:.0f}s") from None
            if not said:
                log.info("init: waiting for %s, held%s (another pilotfish init in this network namespace?)",
                         what, holder(fd))
                said = True
            time.sleep(POLL)


def holders(fd: int) -> list[int]:
    """The pids holding a flock on `fd`'s file, from /proc/locks; empty when none is visible
    (a holder in another PID namespace is shown as pid 0 there)."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = [line.split() for line in f if "FLOCK" in line and "->" not in line]
    except OSError:
        return []
    return [int(fields[4]) for fields in lines
            if len(fields) >= 6 and fields[5] == key and fields[4].isdigit() and fields[4] != "0"]


def holder(fd: int) -> str:
    """` by pid N (command)` for the first visible holder of a flock on `fd`'s file."""
    pids = holders(fd)
    if not pids:
        return ""
    try:
        with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f" by pid {pids[0]}" + (f" ({command[:120]})" if command else "")


def _can_admin_net(pid: int) -> bool:
    """Whether `pid` has CAP_NET_ADMIN in effect; True when that cannot be read (be safe: wait)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True
