"""Traffic probes that the capture tests run *inside* a network namespace, as a chosen uid/gid.

This file is executed as a standalone script (``python nsprobe.py COMMAND ...``) under
``ip netns exec NS setpriv --reuid=U --regid=G ...``; it is not imported by pytest. It uses
the standard library only, so that it runs with whatever interpreter the unprivileged uid can
execute (a virtualenv living under ``/root`` may be unreadable for uid 1000 on some machines).

Every command prints JSON lines on stdout, flushed at once, because the harness reads them
through a pipe while the process keeps running:

* listeners first print ``{"event": "ready", ...}`` once they are bound, so the harness never
  has to guess with sleeps, then one ``{"event": "accept"|"query", ...}`` line per connection or
  query;
* clients print exactly one ``{"event": "result", "ok": ..., ...}`` line and exit 0 on success,
  1 on failure.

A TCP listener writes one JSON line back to its client describing what it saw (its tag, the
peer, ``getsockname()``, ``SO_ORIGINAL_DST``). The client reports that line, so the test learns
*which* listener answered from the client's own output, without racing against listener logs.
DNS listeners answer an A/AAAA record whose address is their ``--answer`` value, which plays
the same role.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import socket
import struct
import sys
import threading
from typing import Any

SO_ORIGINAL_DST = 80  # netfilter's SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line and flush: the harness reads stdout while we are still running."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def addr_str(sockaddr: tuple[Any, ...]) -> str:
    """``host:port`` for IPv4, ``[host]:port`` for IPv6 (what the assertions compare to)."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def original_dst(conn: socket.socket) -> str | None:
    """The pre-NAT destination recorded by conntrack, or None if there is none.

    For IPv4 the kernel fills a ``struct sockaddr_in`` (16 bytes); for IPv6 a
    ``struct sockaddr_in6`` (28 bytes) via ``SOL_IPV6``. Without a conntrack entry the call
    fails with ENOENT, which we report as None rather than as an error.
    """
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            host = str(ipaddress.IPv6Address(raw[8:24]))
            return f"[{host}]:{port}"
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        host = socket.inet_ntoa(raw[4:8])
        return f"{host}:{port}"
    except OSError:
        return None


def bound_socket(kind: int, host: str, port: int, transparent: bool) -> socket.socket:
    fam = family_of(host)
    sock = socket.socket(fam, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        # An explicit v6 listener must not also swallow IPv4 (would hide a v4 mis-redirect).
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        # TPROXY delivers packets whose destination is not ours; only a transparent socket
        # may accept them (needs CAP_NET_ADMIN, hence root for this listener).
        if fam == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind((host, port))
    return sock


# --------------------------------------------------------------------------------------------
# TCP listener and client


def cmd_tcp_listen(args: argparse.Namespace) -> int:
    srv = bound_socket(socket.SOCK_STREAM, args.host, args.port, args.transparent)
    srv.listen(64)
    emit({"event": "ready", "tag": args.tag, "local": addr_str(srv.getsockname()),
          "uid": os.getuid(), "gid": os.getgid()})
    while True:
        conn, peer = srv.accept()
        with conn:
            info = {"event": "accept", "tag": args.tag, "peer": addr_str(peer),
                    "local": addr_str(conn.getsockname()), "orig_dst": original_dst(conn),
                    "uid": os.getuid()}
            emit(info)
            try:
                conn.sendall((json.dumps(info, sort_keys=True) + "\n").encode())
            except OSError:
                pass


def cmd_tcp_connect(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"event": "result", "ok": False, "uid": os.getuid(),
                              "target": addr_str((args.host, args.port))}
    try:
        with socket.socket(family_of(args.host), socket.SOCK_STREAM) as sock:
            sock.settimeout(args.timeout)
            if args.bind:
                # e.g. 127.0.0.6: the source Envoy's inbound passthrough uses towards the app.
                sock.bind((args.bind, 0))
            sock.connect((args.host, args.port))
            result["local"] = addr_str(sock.getsockname())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            result["reply"] = json.loads(data) if data.strip() else None
            result["ok"] = result["reply"] is not None
            if not result["ok"]:
                result["error"] = "connection closed without a reply"
    except (OSError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    emit(result)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------
# Minimal DNS (stdlib only): enough to build a query and answer it with one A/AAAA record.


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def decode_question(msg: bytes) -> tuple[int, str, int, int]:
    """Return (id, qname, qtype, offset just past the question)."""
    qid = struct.unpack("!H", msg[:2])[0]
    pos, labels = 12, []
    while msg[pos]:
        ln = msg[pos]
        labels.append(msg[pos + 1:pos + 1 + ln].decode())
        pos += 1 + ln
    pos += 1
    qtype = struct.unpack("!H", msg[pos:pos + 2])[0]
    return qid, ".".join(labels), qtype, pos + 4


def build_query(qid: int, name: str, qtype: int) -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", qtype, 1)


def build_answer(query: bytes, answer: str) -> bytes:
    qid, _name, qtype, end = decode_question(query)
    ip = ipaddress.ip_address(answer)
    rtype = 28 if ip.version == 6 else 1
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1 if rtype == qtype else 0, 0, 0)
    body = query[12:end]
    if rtype == qtype:
        body += struct.pack("!HHHIH", 0xC00C, rtype, 1, 30, len(ip.packed)) + ip.packed
    return header + body


def parse_answer(msg: bytes) -> str | None:
    """First A/AAAA address in a response, or None."""
    ancount = struct.unpack("!H", msg[6:8])[0]
    _qid, _name, _qtype, pos = decode_question(msg)
    for _ in range(ancount):
        if msg[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while msg[pos]:
                pos += 1 + msg[pos]
            pos += 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        rdata = msg[pos:pos + rdlen]
        pos += rdlen
        if rtype in (1, 28):
            return str(ipaddress.ip_address(rdata))
    return None


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("short read")
        data += chunk
    return data


def cmd_dns_listen(args: argparse.Namespace) -> int:
    """UDP and/or TCP DNS server on host:port; records every query and answers ``--answer``."""
    sel = selectors.DefaultSelector()
    udp = tcp = None
    if not args.no_udp:
        udp = bound_socket(socket.SOCK_DGRAM, args.host, args.port, False)
        sel.register(udp, selectors.EVENT_READ, "udp")
    if not args.no_tcp:
        tcp = bound_socket(socket.SOCK_STREAM, args.host, args.port, False)
        tcp.listen(16)
        sel.register(tcp, selectors.EVENT_READ, "tcp")
    emit({"event": "ready", "tag": args.tag, "uid": os.getuid(),
          "local": addr_str((args.host, args.port))})

    def serve_tcp(conn: socket.socket, peer: tuple[Any, ...]) -> None:
        with conn:
            try:
                conn.settimeout(5)
                ln = struct.unpack("!H", recv_exact(conn, 2))[0]
                query = recv_exact(conn, ln)
                _qid, name, _qtype, _ = decode_question(query)
                emit({"event": "query", "proto": "tcp", "tag": args.tag, "name": name,
                      "peer": addr_str(peer), "local": addr_str(conn.getsockname()),
                      "orig_dst": original_dst(conn)})
                reply = build_answer(query, args.answer)
                conn.sendall(struct.pack("!H", len(reply)) + reply)
            except (OSError, ValueError, IndexError, struct.error) as exc:
                emit({"event": "error", "proto": "tcp", "error": str(exc)})

    while True:
        for key, _ in sel.select():
            if key.data == "udp":
                assert udp is not None
                query, peer = udp.recvfrom(4096)
                try:
                    _qid, name, _qtype, _ = decode_question(query)
                    emit({"event": "query", "proto": "udp", "tag": args.tag, "name": name,
                          "peer": addr_str(peer)})
                    udp.sendto(build_answer(query, args.answer), peer)
                except (ValueError, IndexError, struct.error) as exc:
                    emit({"event": "error", "proto": "udp", "error": str(exc)})
            else:
                assert tcp is not None
                conn, peer = tcp.accept()
                threading.Thread(target=serve_tcp, args=(conn, peer), daemon=True).start()


def cmd_dns_query(args: argparse.Namespace) -> int:
    """Send one query and report the answer and, for UDP, the address the reply came from.

    The UDP socket is connected, so a reply whose source was not un-NATed back to the server
    address (broken conntrack zones) is discarded by the kernel and shows up as a timeout.
    """
    fam = family_of(args.server)
    qtype = 28 if args.aaaa else 1
    qid = os.getpid() & 0xFFFF
    query = build_query(qid, args.name, qtype)
    result: dict[str, Any] = {"event": "result", "ok": False, "proto": args.proto,
                              "uid": os.getuid(), "server": addr_str((args.server, args.port))}
    try:
        if args.proto == "udp":
            with socket.socket(fam, socket.SOCK_DGRAM) as sock:
                sock.settimeout(args.timeout)
                sock.connect((args.server, args.port))
                sock.send(query)
                reply, src = sock.recvfrom(4096)
                result["reply_from"] = addr_str(src)
        else:
            with socket.socket(fam, socket.SOCK_STREAM) as sock:
                sock.settimeout(args.timeout)
                sock.connect((args.server, args.port))
                sock.sendall(struct.pack("!H", len(query)) + query)
                ln = struct.unpack("!H", recv_exact(sock, 2))[0]
                reply = recv_exact(sock, ln)
                result["reply_from"] = addr_str(sock.getpeername())
        if struct.unpack("!H", reply[:2])[0] != qid:
            raise ValueError("reply id does not match the query id")
        result["answer"] = parse_answer(reply)
        result["ok"] = result["answer"] is not None
        if not result["ok"]:
            result["error"] = "reply without an address record"
    except (OSError, ValueError, IndexError, struct.error) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    emit(result)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tcp-listen")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--transparent", action="store_true")
    p.set_defaults(func=cmd_tcp_listen)

    p = sub.add_parser("tcp-connect")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--bind", default="", help="source address to bind before connecting")
    p.set_defaults(func=cmd_tcp_connect)

    p = sub.add_parser("dns-listen")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--answer", required=True)
    p.add_argument("--no-udp", action="store_true")
    p.add_argument("--no-tcp", action="store_true")
    p.set_defaults(func=cmd_dns_listen)

    p = sub.add_parser("dns-query")
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--proto", choices=["udp", "tcp"], default="udp")
    p.add_argument("--name", default="probe.example.com")
    p.add_argument("--aaaa", action="store_true")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=cmd_dns_query)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
