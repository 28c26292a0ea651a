"""Reading a serialized NameTable (the bytes of an NDS resource) one entry at a time.

protobuf's `FromString` decodes the whole message in one C call that holds the GIL: 0.2 s for
500,000 services, 0.4 s for a million, during which no query is answered. Walked here in Python
(the encoding is https://protobuf.dev/programming-guides/encoding/), the build can pause between
entries (dns/rebuild.py). What protobuf refuses is refused (truncated or malformed input,
strings that are not UTF-8, groups), as a TableError; unknown fields are skipped, a field given
twice keeps the last value (repeated ones accumulate). A host given twice, which protobuf
resolves to the last entry, merges like two entries sharing an alias (LookupTable).

    message NameTable {
      message NameInfo { repeated string ips = 1; string registry = 2; string shortname = 3;
                         string namespace = 4; repeated string alt_hosts = 5; }
      map<string, NameInfo> table = 1;   // on the wire: repeated {string key = 1; NameInfo value = 2;}
    }
"""

from __future__ import annotations

from collections.abc import Iterator

from .table import TableEntry, TableError

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def name_table_entries(data: bytes) -> Iterator[tuple[str, TableEntry]]:
    """(host, NameInfo) of every map entry of a serialized NameTable, in wire order."""
    try:
        pos, end = 0, len(data)
        while pos < end:
            tag, pos = _varint(data, pos)
            if tag == 0x0A:  # field 1 (table), length-delimited: one map entry
                size, pos = _varint(data, pos)
                stop = _within(pos + size, end)
                yield _map_entry(data, pos, stop)
                pos = stop
            else:
                pos = _skip(data, pos, tag, end)
    except UnicodeDecodeError as err:
        raise TableError(f"not a NameTable: a string is not UTF-8 ({err.reason})") from None
    except IndexError:
        raise TableError("not a NameTable: truncated") from None


def _map_entry(data: bytes, pos: int, stop: int) -> tuple[str, TableEntry]:
    host = ""
    fields: tuple[list[str], list[str], list[str], list[str], list[str]] = ([], [""], [""], [""], [])
    while pos < stop:
        tag, pos = _varint(data, pos)
        if tag == 0x0A:  # key
            size, pos = _varint(data, pos)
            end = _within(pos + size, stop)
            host = str(data[pos:end], "utf-8")
            pos = end
        elif tag == 0x12:  # value: NameInfo (occurrences merge)
            size, pos = _varint(data, pos)
            end = _within(pos + size, stop)
            _name_info(data, pos, end, fields)
            pos = end
        else:
            pos = _skip(data, pos, tag, stop)
    ips, registry, shortname, namespace, alt_hosts = fields
    return host, TableEntry(tuple(ips), registry[-1], shortname[-1], namespace[-1], tuple(alt_hosts))


def _name_info(data: bytes, pos: int, stop: int, fields: tuple[list[str], ...]) -> None:
    """Fields 1-5 are all strings (length-delimited); each value is appended to its list."""
    while pos < stop:
        tag, pos = _varint(data, pos)
        number = tag >> 3
        if tag & 7 == _LENGTH and 1 <= number <= 5:
            size, pos = _varint(data, pos)
            end = _within(pos + size, stop)
            fields[number - 1].append(str(data[pos:end], "utf-8"))
            pos = end
        else:
            pos = _skip(data, pos, tag, stop)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos + 1
        shift += 7
        if shift >= 64:
            raise TableError("not a NameTable: malformed varint")


def _within(end: int, limit: int) -> int:
    if end > limit:
        raise IndexError
    return end


def _skip(data: bytes, pos: int, tag: int, limit: int) -> int:
    """Past an unknown field's value."""
    kind = tag & 7
    if tag >> 3 == 0:
        raise TableError("not a NameTable: field number 0")
    if kind == _VARINT:
        return _within(_varint(data, pos)[1], limit)
    if kind == _FIXED64:
        return _within(pos + 8, limit)
    if kind == _FIXED32:
        return _within(pos + 4, limit)
    if kind == _LENGTH:
        size, pos = _varint(data, pos)
        return _within(pos + size, limit)
    raise TableError(f"not a NameTable: wire type {kind}")
