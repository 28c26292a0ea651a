"""What routing a capture configuration needs, and the IPv6 passthrough address, kept apart from
routes.py: deciding and adding ::6 (the common IPv6 case) need no pyroute2, whose import takes
~0.1 s of every init container's start."""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

PASSTHROUGH_V6 = "::6"  # Envoy's inbound passthrough source address in IPv6


@dataclass(frozen=True)
class RouteSpec:
    """What a configuration needs: policy routing for TPROXY, the ::6 address for IPv6."""

    mark: int
    table: int
    families: tuple[int, ...]
    tproxy: bool  # TPROXY mode with inbound ports to capture
    passthrough_v6: bool  # IPv6 enabled

    @property
    def empty(self) -> bool:
        return not self.tproxy and not self.passthrough_v6

    def satisfied(self) -> bool:
        """Nothing to install: no TPROXY, and ::6 (if needed) is on lo already."""
        return not self.tproxy and (not self.passthrough_v6 or has_passthrough_address())


def has_passthrough_address() -> bool:
    """Whether ::6 is configured on lo (/proc/net/if_inet6: address, ifindex, ..., name)."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.split()[0] == "0" * 31 + "6" and line.split()[-1] == "lo" for line in f)
    except OSError:
        return False


SIOCSIFADDR = 0x8916
SIOCDIFADDR = 0x8936


def _passthrough_ioctl(request: int) -> None:
    """Add or delete ::6/128 on lo with the in6_ifreq ioctl (address, prefix length, ifindex)."""
    ifreq = struct.pack("16sIi", socket.inet_pton(socket.AF_INET6, PASSTHROUGH_V6), 128, socket.if_nametoindex("lo"))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        import fcntl

        fcntl.ioctl(sock.fileno(), request, ifreq)


def add_passthrough_address() -> bool:
    """Put ::6/128 on lo (Envoy's inbound passthrough source); False if it was there already."""
    try:
        _passthrough_ioctl(SIOCSIFADDR)
    except OSError as err:
        if err.errno == errno.EEXIST:
            return False
        raise OSError(err.errno, f"adding {PASSTHROUGH_V6}/128 to lo: {err.strerror}") from None
    return True


def remove_passthrough_address() -> None:
    try:
        _passthrough_ioctl(SIOCDIFADDR)
    except OSError as err:
        if err.errno not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
            raise
