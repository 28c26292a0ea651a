"""The status port's listening sockets: every interface, and loopback with queues of its own.

The port must listen on every interface (kubelet probes the pod's address), but one wildcard
socket has one accept queue: under a flood from the pod network, a local probe's connection
(Envoy's 15021 health listener forwards to 127.0.0.1:15020) waits behind hundreds of the
flood's in the kernel's queue before the server even sees it, whatever the server does with
them after (measured: local readiness median 4 ms with a queue of its own, 103 ms without, under
the same flood). So 127.0.0.1 and ::1 get listening sockets of their own on the same port, next
to the wildcard ones: Linux hands a connection to the listener bound to its exact destination
address before a wildcard one, so loopback connections arrive in queues no remote peer can
fill. Binding the same port twice needs SO_REUSEPORT on every one of these sockets (Linux
allows it only between sockets of one user, so no other user can join the port).

Plain non-blocking sockets, not trio's: the server accepts in batches (status.py).
"""

from __future__ import annotations

import errno
import socket

WILDCARDS = ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))
LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
# no IPv6 in this network namespace, or no ::1 (IPv6 disabled on lo)
MISSING_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


def open_listeners(port: int, host: str = "") -> list[socket.socket]:
    """Listening sockets on `host`, or, for "" (every interface), the wildcard addresses and
    the loopback ones, all on one port (`port`, or the one the kernel picked for the first when
    it is 0). An IPv6 address the system lacks is left out."""
    if host:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [_listen(family, host, port, share=False)]
    listeners: list[socket.socket] = []
    try:
        for family, address in WILDCARDS + LOOPBACKS:
            try:
                sock = _listen(family, address, port, share=True)
            except OSError as err:
                if family == socket.AF_INET6 and err.errno in MISSING_FAMILY:
                    continue
                raise
            port = sock.getsockname()[1]
            listeners.append(sock)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _listen(family: int, address: str, port: int, share: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
