"""gRPC's health check (`grpc.health.v1.Health/Check`) as a probe: one call over a connection the
prober made (from 127.0.0.6, which grpcio's channels cannot be told to use).

The least HTTP/2 a unary call needs (RFC 9113): the preface and SETTINGS, one HEADERS frame
(HPACK literals, never indexed, no Huffman: nothing to keep in step with), one DATA frame with
the request, then frames read until the stream ends, answering the server's SETTINGS and PING.
The answer's headers are not decoded: a gRPC server sends a message only for an OK call, so the
HealthCheckResponse's status decides (kubelet: SERVING passes, anything else, or no message,
fails). Bounded: the frames' size (the default 16 KiB, which the client never raises), the data
kept, and the caller's deadline.
"""

from __future__ import annotations

import struct

import trio

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, PADDED = 0x1, 0x1, 0x8
END_HEADERS = 0x4
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE's default; the client never advertises more
MAX_DATA = 64 * 1024  # of response messages kept: a HealthCheckResponse is 2 bytes
STREAM = 1
SERVING = 1
METHOD = "/grpc.health.v1.Health/Check"


class GrpcProbeError(Exception):
    """The call failed: closed, reset, refused (GOAWAY), or no message in the answer."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix: int) -> bytes:
    """RFC 7541 §5.1, the first byte's flags all 0."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((value,))
    out, value = bytearray((top,)), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Each header a literal without indexing with a literal name (RFC 7541 §6.2.2)."""
    out = b""
    for name, value in headers:
        name_bytes, value_bytes = name.encode("latin-1"), value.encode("latin-1")
        out += b"\x00" + _hpack_int(len(name_bytes), 7) + name_bytes + _hpack_int(len(value_bytes), 7) + value_bytes
    return out


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def check_request(service: str) -> bytes:
    """A gRPC message (uncompressed, length-prefixed) holding HealthCheckRequest{service}."""
    message = b"\x0a" + _varint(len(service.encode())) + service.encode() if service else b""
    return b"\x00" + struct.pack(">I", len(message)) + message


def serving_status(data: bytes) -> int:
    """HealthCheckResponse.status from the first gRPC message in `data` (0, UNKNOWN, if unset)."""
    if len(data) < 5 or data[0] != 0:
        raise GrpcProbeError("no uncompressed message in the answer")
    (length,) = struct.unpack(">I", data[1:5])
    message, status, at = data[5:5 + length], 0, 0
    if len(message) != length:
        raise GrpcProbeError("a truncated message")
    while at < len(message):  # fields: a varint key, then a varint or a length-delimited value
        key, at = _read_varint(message, at)
        if key & 7 == 0:
            value, at = _read_varint(message, at)
            if key >> 3 == 1:
                status = value
        elif key & 7 == 2:
            size, at = _read_varint(message, at)
            at += size
        else:
            raise GrpcProbeError(f"unexpected wire type {key & 7}")
    return status


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 128:
            return value, at
    raise GrpcProbeError("a truncated message")


async def check(stream: trio.abc.Stream, authority: str, service: str, user_agent: str) -> int:
    """Call Health/Check on `stream` (a connection to the server, plaintext); the status it
    answers (1 is SERVING). The caller bounds the time."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", authority),
               ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", user_agent)]
    await stream.send_all(PREFACE + frame(SETTINGS, 0, 0)
                          + frame(HEADERS, END_HEADERS, STREAM, header_block(headers))
                          + frame(DATA, END_STREAM, STREAM, check_request(service)))
    buffer, data = b"", b""
    while True:
        while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
            if len(buffer) >= 9 and int.from_bytes(buffer[:3], "big") > MAX_FRAME:
                raise GrpcProbeError("a frame larger than allowed")
            chunk = await stream.receive_some(MAX_FRAME)
            if not chunk:
                raise GrpcProbeError("connection closed before the answer")
            buffer += chunk
        length = int.from_bytes(buffer[:3], "big")
        kind, flags, stream_id = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        payload, buffer = buffer[9:9 + length], buffer[9 + length:]
        if kind == SETTINGS and not flags & ACK:
            await stream.send_all(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            await stream.send_all(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            raise GrpcProbeError("the server refused the call (GOAWAY)")
        elif stream_id == STREAM and kind == RST_STREAM:
            raise GrpcProbeError("the server reset the call")
        elif stream_id == STREAM and kind in (DATA, HEADERS):
            if kind == DATA:
                if flags & PADDED and payload:
                    payload = payload[1:len(payload) - payload[0]]
                data = (data + payload)[:MAX_DATA]
            if flags & END_STREAM:
                return serving_status(data)
