"""A request flood on the status port, run as its own process (so that its work does not slow
the test's own probes): `per_source` connections from each source address, each sending a
complete `GET /stats/prometheus` and, once the server answered or closed, opened again at once.

    python request_flood.py HOST4 HOST6 PORT PER_SOURCE SOURCE...

Prints `ready` once every connection was started, runs until SIGTERM, then prints one JSON line:
{"answered": N, "closed": M} (connections the server answered, and closed without an answer).
"""

from __future__ import annotations

import json
import select
import signal
import socket
import sys

REQUEST = b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n"


def main(host4: str, host6: str, port: int, per_source: int, sources: list[str]) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    poller = select.poll()
    socks: dict[int, tuple[socket.socket, str, bool]] = {}  # fd -> (socket, source, request sent)
    answered = closed = 0

    def open_one(source: str) -> None:
        family, target = (socket.AF_INET6, host6) if ":" in source else (socket.AF_INET, host4)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex((target, port))
        socks[sock.fileno()] = (sock, source, False)
        poller.register(sock, select.POLLOUT)

    for source in sources:
        for _ in range(per_source):
            open_one(source)
    print("ready", flush=True)
    while not stop:
        for fd, event in poller.poll(20):
            sock, source, sent = socks[fd]
            if not sent and event & select.POLLOUT and not event & (select.POLLERR | select.POLLHUP):
                try:
                    sock.send(REQUEST)
                except OSError:
                    pass
                socks[fd] = (sock, source, True)
                poller.modify(fd, select.POLLIN)
                continue
            try:
                got = sock.recv(65536)
            except OSError:
                got = b""
            if got.startswith(b"HTTP/1.1 "):
                answered += 1
            else:
                closed += 1
            poller.unregister(fd)
            del socks[fd]
            sock.close()
            open_one(source)
    print(json.dumps({"answered": answered, "closed": closed}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
