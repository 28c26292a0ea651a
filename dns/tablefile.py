"""Reading a NameTable from a file in protobuf's JSON mapping (what `pilotfish dns` serves).

The same shape istiod's NDS resource has, so a table dumped from Istio's /debug/ndsz (minus the
generated alias keys) or written by hand works:
`{"table": {"host": {"ips": [...], "registry": "Kubernetes", "shortname": ..., "namespace": ...,
"altHosts": [...]}}}` (`alt_hosts` is accepted too).

The file is parsed one entry at a time (`table_entries`), not with one `json.loads` of the whole
document: that is a single C call holding the GIL (1.6 s for 500,000 services), during which a
reload would stop the threads serving the current table; the protobuf message the file used to be
turned into (json_format.ParseDict, 13 s at 500,000) is not built at all. Each entry's value is
decoded by the json module's own C scanner and checked here as json_format would check it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from json.scanner import make_scanner
from typing import Any

from pilotfish.common.files import UnreadableFile, read_regular_file

from .table import TableEntry

# The file is read whole: this bound stops a wrong path (a disk image, a log) from being read
# into memory. 1 GiB is seven times the file of a 1,000,000-service table (137 MB).
TABLE_FILE_MAX = 1 << 30

# The json scanner recurses once per level of nesting, so a value nested deeper than Python's
# recursion limit (about 1,000 levels; a NameTable is four deep) raises RecursionError: bad input
# like any other, not a crash of the running proxy.
TOO_DEEP = "nested too deeply to be a NameTable (one is four levels deep)"

_scan = make_scanner(json.JSONDecoder())
_space = re.compile(r"[ \t\n\r]*").match
_FIELDS = frozenset(("ips", "registry", "shortname", "namespace", "altHosts", "alt_hosts"))


class TableFileError(ValueError):
    """The file cannot be read or is not a NameTable; the message says which and why."""


def table_entries(path: str) -> Iterator[tuple[str, TableEntry]]:
    """The file's entries in file order, checked one by one; any fault, at whatever point of the
    file, is a TableFileError naming the file (the caller builds nothing from a file that fails).
    The file is read at the first step."""
    try:
        data = read_regular_file(path, TABLE_FILE_MAX)
    except UnreadableFile as err:
        raise TableFileError(f"{path}: {err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TableFileError(f"{path}: not UTF-8 text: {err}") from None
    del data
    try:
        yield from _entries(text)
    except json.JSONDecodeError as err:
        raise TableFileError(f"{path}: not JSON: {err}") from None
    except RecursionError:
        raise TableFileError(f"{path}: {TOO_DEEP}") from None
    except _NotATable as err:
        raise TableFileError(f"{path}: not a NameTable: {err}") from None


class _NotATable(ValueError):
    pass


def _entries(text: str) -> Iterator[tuple[str, TableEntry]]:
    """`{"table": {host: NameInfo, ...}}` (the table may be null or absent), walked member by
    member; values are decoded by the json module's C scanner."""
    pos = _open_object(text, _space(text, 0).end(), 'want an object {"table": {host: NameInfo}}')
    first = True
    while True:
        pos = _space(text, pos).end()
        if text.startswith("}", pos):
            pos += 1
            break
        if not first:
            pos = _space(text, _expect(text, pos, ",", "Expecting ',' delimiter")).end()
        first = False
        key, pos = _member_name(text, pos)
        if key != "table":
            raise _NotATable(f"unknown field {key!r} (the file holds one field, \"table\")")
        if text.startswith("null", pos):
            pos += 4
            continue
        pos = _open_object(text, pos, '"table" must be an object {host: NameInfo}')
        pos = yield from _table(text, pos)
    pos = _space(text, pos).end()
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)


def _table(text: str, pos: int) -> Iterator[tuple[str, TableEntry]]:
    """The members of the table object, from just after its `{`; returns the position after `}`."""
    first = True
    while True:
        pos = _space(text, pos).end()
        if text.startswith("}", pos):
            return pos + 1
        if not first:
            pos = _space(text, _expect(text, pos, ",", "Expecting ',' delimiter")).end()
        first = False
        host, pos = _member_name(text, pos)
        value, pos = _value(text, pos)
        yield host, _entry(host, value)


def _entry(host: str, value: Any) -> TableEntry:
    """A NameInfo as json_format reads it: known fields only, null for a default."""
    if type(value) is not dict:
        raise _NotATable(f"entry {host!r}: want an object (NameInfo), got {_shown(value)}")
    if not value.keys() <= _FIELDS:
        raise _NotATable(f"entry {host!r}: unknown field {min(value.keys() - _FIELDS)!r}")
    if "altHosts" in value and "alt_hosts" in value:
        raise _NotATable(f"entry {host!r}: altHosts and alt_hosts both given")
    alt = "altHosts" if "altHosts" in value else "alt_hosts"
    return TableEntry(
        _strings(host, "ips", value.get("ips")),
        _string(host, "registry", value.get("registry")),
        _string(host, "shortname", value.get("shortname")),
        _string(host, "namespace", value.get("namespace")),
        _strings(host, alt, value.get(alt)),
    )


def _string(host: str, name: str, value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise _NotATable(f"entry {host!r}: {name} must be a string, got {_shown(value)}")
    return value


def _strings(host: str, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if type(value) is not list or not all(type(item) is str for item in value):
        raise _NotATable(f"entry {host!r}: {name} must be a list of strings, got {_shown(value)}")
    return tuple(value)


def _open_object(text: str, pos: int, message: str) -> int:
    """The position after the `{` at pos; another JSON value there is not a NameTable."""
    if text.startswith("{", pos):
        return pos + 1
    if pos < len(text) and text[pos] in '["-0123456789tfn':
        raise _NotATable(message)
    raise json.JSONDecodeError("Expecting value", text, pos)


def _expect(text: str, pos: int, char: str, message: str) -> int:
    if not text.startswith(char, pos):
        raise json.JSONDecodeError(message, text, pos)
    return pos + 1


def _value(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _scan(text, pos)
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None


def _member_name(text: str, pos: int) -> tuple[str, int]:
    """A member's name and the position of its value (after the colon and spaces)."""
    if not text.startswith('"', pos):
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
    name, pos = _value(text, pos)
    pos = _expect(text, _space(text, pos).end(), ":", "Expecting ':' delimiter")
    return name, _space(text, pos).end()


def _shown(value: Any) -> str:
    """A bad value as JSON, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (None while it is missing)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
