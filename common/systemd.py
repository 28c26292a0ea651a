"""systemd's notify protocol (sd_notify(3)) without libsystemd: datagrams of `KEY=value` lines to
the unix socket named by NOTIFY_SOCKET (a path, or `@name` in the abstract namespace). A unit of
`Type=notify` is started only once READY=1 comes, and with `WatchdogSec=` it is restarted when
WATCHDOG=1 stops coming. Unset NOTIFY_SOCKET (not under systemd): nothing is sent.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address, with `@` turned into the abstract namespace's leading NUL."""
    path = env.get("NOTIFY_SOCKET", "")
    if not path or not (path.startswith("/") or path.startswith("@")):
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's timeout, as sd_watchdog_enabled advises);
    None without a watchdog, or when WATCHDOG_PID names another process."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2_000_000


def message(**fields: str) -> bytes:
    """`READY="1", STATUS="..."` as the protocol's lines (a value holds no newline)."""
    return "".join(f"{key}={' '.join(value.splitlines())}\n" for key, value in fields.items()).encode()


class Notifier:
    """One datagram socket to systemd; a failed send is dropped (systemd may be gone at shutdown).
    Non-blocking: it is sent from trio's loop, and a systemd not reading its queue must not stop
    the agent (the message is dropped; the next one carries the state again)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    def send(self, **fields: str) -> bool:
        try:
            self._sock.sendto(message(**fields), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self._sock.close()
