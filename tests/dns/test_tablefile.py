"""Reading a NameTable file entry by entry: what it reads is what protobuf's json_format reads, and
every file that does not load is one TableFileError naming the file and the fault, never another
exception (the caller logs one line and keeps its table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vectors import distinct_tables, name_table

from pilotfish.dns.table import TableEntry
from pilotfish.dns.tablefile import TableFileError, table_entries

DEPTH = 1000  # issue 7 items 5 and 14: 1,000 levels killed `pilotfish dns`


def _load(tmp_path: Path, text: str) -> list[tuple[str, TableEntry]]:
    path = tmp_path / "table.json"
    path.write_text(text)
    return list(table_entries(str(path)))


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(TableFileError) as err:
        _load(tmp_path, text)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'table.json'}: ")
    return message.split(": ", 1)[1]


@pytest.mark.parametrize("indent", [None, 2])
def test_reads_what_json_format_reads(tmp_path: Path, indent: int | None) -> None:
    """Every table of Istio's vectors, read both ways."""
    for table in distinct_tables():
        message = name_table(table)
        entries = _load(tmp_path, json.dumps({"table": table}, indent=indent))
        assert [host for host, _ in entries] == list(table)
        for host, entry in entries:
            info = message.table[host]
            assert entry == TableEntry(tuple(info.ips), info.registry, info.shortname, info.namespace,
                                       tuple(info.alt_hosts)), host


@pytest.mark.parametrize("text", ["{}", '{"table": null}', '{"table": {}}', ' \n{ "table" : { } }\n '])
def test_empty_tables(tmp_path: Path, text: str) -> None:
    assert _load(tmp_path, text) == []


def test_nulls_are_defaults_and_both_alt_hosts_spellings_read(tmp_path: Path) -> None:
    entries = _load(tmp_path, json.dumps({"table": {
        "a": {"ips": None, "registry": None, "altHosts": ["x"]},
        "b": {"alt_hosts": ["y"], "namespace": "ns"},
    }}))
    assert entries == [("a", TableEntry((), "", "", "", ("x",))), ("b", TableEntry((), "", "", "ns", ("y",)))]


@pytest.mark.parametrize(
    "text,fault",
    [
        ("", "not JSON: Expecting value: line 1 column 1 (char 0)"),
        ('{"table": {"a": {}', "not JSON: Expecting ',' delimiter: line 1 column 19 (char 18)"),
        ('{"table": {"a": {}}} x', "not JSON: Extra data: line 1 column 22 (char 21)"),
        ('{"table": {"a" {}}}', "not JSON: Expecting ':' delimiter: line 1 column 16 (char 15)"),
        ('{"table": {a: {}}}', "not JSON: Expecting property name enclosed in double quotes"),
        ('{"table": {"a": {"ips": [1,]}}}', "not JSON: Expecting value"),
        ("[]", 'not a NameTable: want an object {"table": {host: NameInfo}}'),
        ('{"tables": {}}', "not a NameTable: unknown field 'tables'"),
        ('{"table": []}', 'not a NameTable: "table" must be an object'),
        ('{"table": {"a": []}}', "not a NameTable: entry 'a': want an object (NameInfo), got []"),
        ('{"table": {"a": {"ip": []}}}', "not a NameTable: entry 'a': unknown field 'ip'"),
        ('{"table": {"a": {"ips": "1.2.3.4"}}}', "entry 'a': ips must be a list of strings, got \"1.2.3.4\""),
        ('{"table": {"a": {"ips": [1]}}}', "entry 'a': ips must be a list of strings, got [1]"),
        ('{"table": {"a": {"registry": 1}}}', "entry 'a': registry must be a string, got 1"),
        ('{"table": {"a": {"altHosts": [], "alt_hosts": []}}}', "entry 'a': altHosts and alt_hosts both given"),
        ('{"table": {"a": {"ips": [' + ",".join(['"1.2.3.4"'] * 20) + ', 5]}}}', 'got ["1.2.3.4", "1.2.3.4", "1.2.3.4", "1....'),
    ],
)
def test_faults_are_named(tmp_path: Path, text: str, fault: str) -> None:
    assert fault in _error(tmp_path, text)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_bytes(b'{"table": {"\xff": {}}}')
    with pytest.raises(TableFileError, match="not UTF-8 text"):
        list(table_entries(str(path)))


def test_a_fault_late_in_the_file_is_found_after_the_good_entries(tmp_path: Path) -> None:
    """Entries come one by one; the caller builds nothing until the last one came through."""
    path = tmp_path / "table.json"
    path.write_text('{"table": {"a": {"ips": ["10.0.0.1"]}, "b": {"ips": 5}}}')
    entries = table_entries(str(path))
    assert next(entries)[0] == "a"
    with pytest.raises(TableFileError, match="entry 'b'"):
        next(entries)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "text,fault",
    [
        ('{"table": {"x.example": ' + _nested(DEPTH) + "}}", "nested too deeply"),
        ('{"table": {"x.example": {"ips": ' + _nested(DEPTH) + "}}}", "nested too deeply"),
        ('{"table": {"x.example": ' + '{"ips": ' * DEPTH + "[]" + "}" * DEPTH + "}}", "nested too deeply"),
        ('{"table": ' + _nested(DEPTH) + "}", '"table" must be an object'),
        (_nested(DEPTH * 50), "want an object"),
    ],
    ids=["entry", "ips", "objects", "table", "top-level-50000"],
)
def test_deep_nesting_is_a_table_file_error(tmp_path: Path, text: str, fault: str) -> None:
    assert fault in _error(tmp_path, text)


@pytest.fixture
def tiny_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read 5 bytes at a time, 2 characters ahead: every token crosses a window boundary."""
    from pilotfish.dns import tablefile

    monkeypatch.setattr(tablefile, "CHUNK", 5)
    monkeypatch.setattr(tablefile, "LOOKAHEAD", 2)


def _reference(text: str) -> list[tuple[str, TableEntry]] | str:
    """What json.loads and json_format make of the text: the entries, or the kind of fault."""
    from google.protobuf import json_format

    from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not JSON: {err}"
    if not isinstance(data, dict) or not isinstance(data.get("table", {}), (dict, type(None))):
        return "not a NameTable"
    try:
        message = json_format.ParseDict(data, NameTable())
    except json_format.ParseError:
        return "not a NameTable"
    return sorted((h, TableEntry(tuple(i.ips), i.registry, i.shortname, i.namespace, tuple(i.alt_hosts)))
                  for h, i in message.table.items())


def _ours(tmp_path: Path, text: str) -> list[tuple[str, TableEntry]] | str:
    try:
        return sorted(_load(tmp_path, text))
    except TableFileError as err:
        return str(err).split(": ", 1)[1]


@pytest.mark.usefixtures("tiny_window")
def test_a_tiny_window_reads_every_vector_table(tmp_path: Path) -> None:
    for table in distinct_tables():
        for indent in (None, 1):
            text = json.dumps({"table": table}, indent=indent, ensure_ascii=False)
            assert _ours(tmp_path, text) == _reference(text)


@pytest.mark.usefixtures("tiny_window")
def test_text_split_inside_a_multibyte_character(tmp_path: Path) -> None:
    text = json.dumps({"table": {"ä€😀.example": {"ips": ["10.0.0.1"], "registry": "Ünknown"}}}, ensure_ascii=False)
    assert _ours(tmp_path, text) == _reference(text)
    assert _ours(tmp_path, text)[0][0] == "ä€😀.example"  # type: ignore[index]


@pytest.mark.parametrize("window", ["tiny", "default"])
def test_damaged_files_are_judged_as_json_and_json_format_judge_them(
    tmp_path: Path, window: str, request: pytest.FixtureRequest
) -> None:
    """Random edits of a real table: whenever json.loads and json_format accept the text, the same
    entries come out; whenever they refuse it, so does the reader (a syntax fault, where it is
    the first fault in the file, with json's own message and position)."""
    import random

    if window == "tiny":
        request.getfixturevalue("tiny_window")
    rng = random.Random(11)
    base = json.dumps({"table": distinct_tables()[0]}, indent=1)
    for _ in range(400):
        chars = list(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                del chars[i]
            elif op < 0.8:
                chars.insert(i, rng.choice('{}[]",: \n0an\\'))
            else:
                chars[i] = rng.choice('{}[]",: \n0an')
        text = "".join(chars)
        expect, got = _reference(text), _ours(tmp_path, text)
        if isinstance(expect, list):
            assert got == expect, text
        else:
            assert isinstance(got, str), text
            if got.startswith("not JSON"):
                assert expect.startswith("not JSON"), (text, got)
                assert got == expect, text


def test_the_size_bound_counts_what_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pilotfish.dns import tablefile

    monkeypatch.setattr(tablefile, "TABLE_FILE_MAX", 1000)
    monkeypatch.setattr(tablefile, "CHUNK", 100)
    big = json.dumps({"table": {f"h{i}.example": {"ips": ["10.0.0.1"]} for i in range(40)}})
    assert "is larger than 1000 bytes" in _error(tmp_path, big)
