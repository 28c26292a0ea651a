"""Facts about the network namespace the process runs in, read without netlink (no pyroute2
import): what `pilotfish init` detects (istio-iptables' IPv6 and DNS detection) and what the
agent reports to the control plane as the proxy's addresses (INSTANCE_IPS)."""

from __future__ import annotations

import array
import fcntl
import ipaddress
import socket
import struct

SIOCGIFCONF = 0x8912


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Global addresses of the namespace's interfaces, by interface index (Go's order).

    Read with SIOCGIFCONF (IPv4) and /proc/net/if_inet6 (IPv6) rather than netlink, so detection
    costs no pyroute2 import.
    """
    return [ip for _, ip in interface_addresses()]


def interface_addresses() -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(interface, address) of every global address, by interface index: what the agent reports
    as INSTANCE_IPS, less the interfaces a pod annotation excludes."""
    found: list[tuple[int, str, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    for name, address in _ipv4_addresses():
        found.append((_index(name), name, address))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                found.append((int(fields[1], 16), fields[-1], ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    except OSError:
        pass
    out = []
    for _, name, ip in sorted(found, key=lambda item: item[0]):
        mapped = getattr(ip, "ipv4_mapped", None)
        ip = mapped or ip
        if not (ip.is_loopback or ip.is_link_local):
            out.append((name, ip))
    return out


def _index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 1 << 30


def _ipv4_addresses() -> list[tuple[str, ipaddress.IPv4Address]]:
    """(interface, address) pairs from the SIOCGIFCONF ioctl."""
    size = 40  # struct ifreq on 64-bit Linux
    buf = array.array("B", bytes(size * 256))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifconf = struct.pack("iL", len(buf), buf.buffer_info()[0])
        length = struct.unpack("iL", fcntl.ioctl(sock.fileno(), SIOCGIFCONF, ifconf))[0]
    data = buf.tobytes()[:length]
    out = []
    for off in range(0, length, size):
        name = data[off : off + 16].split(b"\0", 1)[0].decode()
        out.append((name, ipaddress.IPv4Address(data[off + 20 : off + 24])))
    return out
