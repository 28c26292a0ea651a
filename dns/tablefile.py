"""Reading a NameTable from a file in protobuf's JSON mapping (what `pilotfish dns` serves).

The same shape istiod's NDS resource has, so a table dumped from Istio's /debug/ndsz (minus the
generated alias keys) or written by hand works:
`{"table": {"host": {"ips": [...], "registry": "Kubernetes", "shortname": ..., "namespace": ...,
"altHosts": [...]}}}` (`alt_hosts` is accepted too).

The file is read a chunk at a time and parsed one entry at a time (`table_entries`), not with one
`json.loads` of the whole document: that is a single C call holding the GIL (1.6 s for 500,000
services), during which a reload would stop the threads serving the current table, and it needs
the whole text in memory (twice, as bytes then as str: 270 MB at 1,000,000 services). The
protobuf message the file used to be turned into (json_format.ParseDict, 13 s at 500,000) is not
built at all. Each entry's value is decoded by the json module's own C scanner and checked here
as json_format would check it.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from json.scanner import make_scanner
from typing import Any, BinaryIO, TypeVar, cast

from pilotfish.common.files import UnreadableFile, open_regular_file, too_large

from .table import TableEntry

# A bound on what is read: it stops a wrong path (a disk image, a log) from being parsed to the
# end. 1 GiB is seven times the file of a 1,000,000-service table (137 MB).
TABLE_FILE_MAX = 1 << 30
CHUNK = 1 << 20  # bytes read at a time
LOOKAHEAD = 1 << 16  # characters of text kept ahead of the parse (an entry is ~130)
BATCH = 64  # entries parsed in one step

# The json scanner recurses once per level of nesting, so a value nested deeper than Python's
# recursion limit (about 1,000 levels; a NameTable is four deep) raises RecursionError: bad input
# like any other, not a crash of the running proxy.
TOO_DEEP = "nested too deeply to be a NameTable (one is four levels deep)"

# (text, pos) -> (value, end): the json module's C scanner, as json.loads uses it.
_scan = cast("Callable[[str, int], tuple[Any, int]]", make_scanner(cast(Any, json.JSONDecoder())))
# (text, pos) -> the whitespace at pos (always a match, maybe empty).
_space = cast("Callable[[str, int], re.Match[str]]", re.compile(r"[ \t\n\r]*").match)
_FIELDS = frozenset(("ips", "registry", "shortname", "namespace", "altHosts", "alt_hosts"))
_VALUE_START = frozenset('["-0123456789tfn')
_NAME = "Expecting property name enclosed in double quotes"
_TOP = 'want an object {"table": {host: NameInfo}}'
_TABLE = '"table" must be an object {host: NameInfo}'
T = TypeVar("T")


class TableFileError(ValueError):
    """The file cannot be read or is not a NameTable; the message says which and why."""


def table_entries(path: str) -> Iterator[tuple[str, TableEntry]]:
    """The file's entries in file order, checked one by one; any fault, at whatever point of the
    file, is a TableFileError naming the file (the caller builds nothing from a file that fails).
    The file is opened at the first step."""
    try:
        f = open_regular_file(path)
    except UnreadableFile as err:
        raise TableFileError(f"{path}: {err}") from None
    with f:
        text = _Text(f)
        try:
            yield from _entries(text)
        except json.JSONDecodeError as err:
            raise TableFileError(f"{path}: not JSON: {text.where(err)}") from None
        except RecursionError:
            raise TableFileError(f"{path}: {TOO_DEEP}") from None
        except _NotATable as err:
            raise TableFileError(f"{path}: not a NameTable: {err}") from None
        except UnicodeDecodeError as err:
            raise TableFileError(f"{path}: not UTF-8 text: {err}") from None
        except OSError as err:
            raise TableFileError(f"{path}: {err.strerror or err}") from None
        except _TooLarge:
            raise TableFileError(f"{path}: {too_large(TABLE_FILE_MAX)}") from None


class _NotATable(ValueError):
    pass


class _Cut(Exception):
    """The text read so far ends inside what a step parses: read more and run it again."""


class _TooLarge(Exception):
    pass


class _Text:
    """The file's text from `offset` on, read CHUNK bytes at a time as the parse moves on.

    A step is a pure function (text, pos, final) -> (value, pos) over the window; it raises
    _Cut when the window ends inside what it parses and more may follow (`final` false)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._read = 0
        self.text, self.pos, self.final = "", 0, False
        self._offset = self._line = self._column = 0  # where the window starts in the file

    def run(self, step: Callable[..., tuple[T, int]], *args: Any) -> T:
        need = LOOKAHEAD
        while True:
            if len(self.text) - self.pos < need:
                self._fill(need)
            try:
                value, self.pos = step(self.text, self.pos, self.final, *args)
                return value
            except _Cut:
                need = 2 * max(need, len(self.text) - self.pos)

    def _fill(self, need: int) -> None:
        if self.final:
            return
        text, pos = self.text, self.pos
        newline = text.rfind("\n", 0, pos)
        self._line += text.count("\n", 0, pos)
        self._column = pos - newline - 1 if newline >= 0 else self._column + pos
        self._offset += pos
        parts = [text[pos:]]
        size = len(parts[0])
        while size < need and not self.final:
            chunk = self._f.read(CHUNK)
            self._read += len(chunk)
            if self._read > TABLE_FILE_MAX:
                raise _TooLarge
            part = self._decoder.decode(chunk, final=not chunk)
            self.final = not chunk
            parts.append(part)
            size += len(part)
        self.text, self.pos = "".join(parts), 0

    def where(self, err: json.JSONDecodeError) -> str:
        """json's message, with the position in the file rather than in the window."""
        text, pos = self.text, err.pos
        newline = text.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self._column + pos + 1
        line = self._line + text.count("\n", 0, pos) + 1
        return f"{err.msg}: line {line} column {column} (char {self._offset + pos})"


def _entries(text: _Text) -> Iterator[tuple[str, TableEntry]]:
    """`{"table": {host: NameInfo, ...}}` (the table may be null or absent), member by member."""
    text.run(_object_start, _TOP)
    first = True
    while (key := text.run(_next_member, first)) is not None:
        first = False
        if key != "table":
            raise _NotATable(f"unknown field {key!r} (the file holds one field, \"table\")")
        if text.run(_null_or_object_start, _TABLE):
            continue
        first_entry, done = True, False
        while not done:
            batch, done = text.run(_members, first_entry)
            first_entry = False
            for host, value in batch:
                yield host, _entry(host, value)
    text.run(_end)


def _blank(text: str, pos: int, final: bool, expecting: str) -> int:
    """Past the whitespace at pos; something must follow."""
    pos = _space(text, pos).end()
    if pos == len(text):
        if not final:
            raise _Cut
        raise json.JSONDecodeError(expecting, text, pos)
    return pos


def _object_start(text: str, pos: int, final: bool, message: str) -> tuple[None, int]:
    """Past a `{`; another JSON value there is not a NameTable."""
    pos = _blank(text, pos, final, "Expecting value")
    if text[pos] == "{":
        return None, pos + 1
    if text[pos] in _VALUE_START:
        raise _NotATable(message)
    raise json.JSONDecodeError("Expecting value", text, pos)


def _null_or_object_start(text: str, pos: int, final: bool, message: str) -> tuple[bool, int]:
    """True past a `null`, False past a `{`."""
    pos = _blank(text, pos, final, "Expecting value")
    if text.startswith("null", pos):
        return True, pos + 4
    if not final and "null".startswith(text[pos:]):
        raise _Cut
    _, pos = _object_start(text, pos, final, message)
    return False, pos


def _next_member(text: str, pos: int, final: bool, first: bool) -> tuple[str | None, int]:
    """The next member's name, past its colon; None past the object's `}`."""
    pos = _blank(text, pos, final, _NAME if first else "Expecting ',' delimiter")
    if text[pos] == "}":
        return None, pos + 1
    if not first:
        if text[pos] != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _blank(text, pos + 1, final, _NAME)
    if text[pos] != '"':
        raise json.JSONDecodeError(_NAME, text, pos)
    name, pos = _value(text, pos, final)
    pos = _blank(text, pos, final, "Expecting ':' delimiter")
    if text[pos] != ":":
        raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
    return name, pos + 1


def _members(text: str, pos: int, final: bool, first: bool) -> tuple[tuple[list[tuple[str, Any]], bool], int]:
    """The next members of an object, (name, value) each, up to BATCH of them or until the
    window runs low; True past the object's `}`. One step for many members: entries are small
    and many, and each step costs a few function calls."""
    batch: list[tuple[str, Any]] = []
    low = len(text) if final else len(text) - LOOKAHEAD // 2
    while True:
        fast = _plain_member(text, pos, first)
        if fast is not None:
            name, value, pos = fast
        else:
            careful, pos = _next_member(text, pos, final, first)
            if careful is None:
                return (batch, True), pos
            name = careful
            value, pos = _value(text, pos, final)
        batch.append((name, value))
        first = False
        if pos >= low or len(batch) == BATCH:
            return (batch, False), pos


def _plain_member(text: str, pos: int, first: bool) -> tuple[str, Any, int] | None:
    """`[,] "name": value` when it is written plainly and wholly in the window, else None (the
    careful path then reads it, raising what is wrong): it saves a fifth of the parse."""
    try:
        pos = _space(text, pos).end()
        if not first:
            if text[pos] != ",":
                return None
            pos = _space(text, pos + 1).end()
        if text[pos] != '"':
            return None
        name, pos = _scan(text, pos)
        pos = _space(text, pos).end()
        if text[pos] != ":":
            return None
        value, pos = _scan(text, _space(text, pos + 1).end())
        if pos < len(text) and type(value) is dict:
            return name, value, pos
    except (IndexError, StopIteration, ValueError):
        pass
    return None


def _value(text: str, pos: int, final: bool) -> tuple[Any, int]:
    """The JSON value at pos (after whitespace), decoded by the C scanner."""
    pos = _blank(text, pos, final, "Expecting value")
    try:
        value, end = _scan(text, pos)
    except StopIteration as stop:
        if not final:
            raise _Cut from None
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    except json.JSONDecodeError:
        if not final:
            raise _Cut from None
        raise
    if end == len(text) and not final:  # a number may go on
        raise _Cut
    return value, end


def _end(text: str, pos: int, final: bool) -> tuple[None, int]:
    """Only whitespace after the document."""
    pos = _space(text, pos).end()
    if pos != len(text):
        raise json.JSONDecodeError("Extra data", text, pos)
    if not final:
        raise _Cut
    return None, pos


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


def _shown(value: Any) -> str:
    """A bad value as JSON, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
