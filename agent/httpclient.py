"""A bounded HTTP/1.1 GET on trio, for the status server's outbound requests: the application's
HTTP probes (agent/prober.py), the metrics targets it merges (agent/metricsmerge.py), and
Envoy's admin API (agent/envoy/admin.py, whose drains are body-less POSTs).

One request per connection (`Connection: close`, as kubelet's probes), from a chosen source
address when asked (probes come from 127.0.0.6), TLS without verification when asked (kubelet
does not verify a probe's certificate). Everything is bounded: the whole exchange by the
caller's timeout, the response head by MAX_HEAD, the body by the caller's `max_body` (read up to
one byte more, so that "over the cap" is known). Any failure is a FetchError.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from functools import cache

import trio

MAX_HEAD = 64 * 1024  # the response's status line and headers
READ_SIZE = 65536
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header's name (RFC 9110 §5.6.2)
FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # a header's value: no CR, LF, NUL (RFC 9110 §5.5)


class FetchError(Exception):
    """The request failed: not connected, timed out, broken, or not an HTTP/1.x response."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes  # at most max_body bytes
    over: bool  # the body was longer than max_body


@cache
def _insecure_tls() -> ssl.SSLContext:
    """Made on first use only: an SSLContext costs the agent ~0.7 MB (docs/agent.md)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store loaded: nothing is verified
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def get(host: str, port: int, target: str, headers: list[tuple[str, str]], *, timeout: float, max_body: int,
              source: str | None = None, tls: bool = False, method: str = "GET") -> Reply:
    """GET (or `method`, without a body: Envoy's admin POSTs) `target` from host:port within
    `timeout` seconds. `headers` go as given (Host among them if the caller wants one; else
    host:port); `Connection: close` is added."""
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await connect(host, port, source)
            if tls:
                stream = trio.SSLStream(stream, _insecure_tls(), server_hostname=None if _is_ip(host) else host)
            async with stream:
                await stream.send_all(_request(method, host, port, target, headers))
                return await _response(_Reader(stream), max_body)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, ValueError) as err:
            raise FetchError(f"{type(err).__name__}: {err}") from None
    assert scope.cancelled_caught
    raise FetchError(f"no answer within {timeout:g}s")


async def connect(host: str, port: int, source: str | None) -> trio.abc.Stream:
    """A TCP connection to host:port; from `source` (then `host` must be an IP address) when given."""
    if source is None:
        return await trio.open_tcp_stream(host, port)
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _request(method: str, host: str, port: int, target: str, headers: list[tuple[str, str]]) -> bytes:
    if not any(name.lower() == "host" for name, _ in headers):
        authority = f"[{host}]" if ":" in host else host
        headers = [("Host", f"{authority}:{port}"), *headers]
    if method != "GET":
        headers = [*headers, ("Content-Length", "0")]
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers), "Connection: close",
             "", ""]
    return "\r\n".join(lines).encode("latin-1")


class _Reader:
    """Buffered reads from a stream, each bounded."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()  # appended to and cut from the front: no copy of what stays
        self.eof = False

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(READ_SIZE)
        if not chunk:
            self.eof = True
        self._buffer += chunk

    async def until(self, mark: bytes, limit: int) -> bytes:
        """Up to and without `mark`; FetchError past `limit` bytes or at the end of the stream."""
        while (at := self._buffer.find(mark)) < 0:
            if len(self._buffer) > limit or self.eof:
                raise FetchError("response head too long" if not self.eof else "connection closed mid-response")
            await self._fill()
        out = bytes(self._buffer[:at])
        del self._buffer[:at + len(mark)]
        return out

    async def take(self, size: int) -> bytes:
        """`size` bytes, fewer only at the end of the stream."""
        while len(self._buffer) < size and not self.eof:
            await self._fill()
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


async def _response(reader: _Reader, max_body: int) -> Reply:
    while True:
        status, headers = parse_head(await reader.until(b"\r\n\r\n", MAX_HEAD))
        if not 100 <= status < 200 or status == 101:  # interim answers (100 Continue) are skipped, as Go does
            break
    cap = max_body + 1
    if status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _chunked(reader, cap)
    elif "content-length" in headers:
        length = headers["content-length"].strip()
        if not length.isdigit():
            raise FetchError(f"bad Content-Length {length!r}")
        body = await reader.take(min(int(length), cap))
    else:
        body = await reader.take(cap)  # to the end of the stream
    return Reply(status, headers, body[:max_body], len(body) > max_body)


async def _chunked(reader: _Reader, cap: int) -> bytes:
    body = bytearray()
    while len(body) < cap:
        size_line = (await reader.until(b"\r\n", 1024)).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise FetchError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            break
        body += await reader.take(min(size, cap - len(body)))
        if len(body) < cap:
            await reader.until(b"\r\n", 2)
    return bytes(body)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers of a response head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise FetchError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers
