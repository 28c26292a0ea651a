"""Reading a NameTable file: every file that does not load is one TableFileError naming the file
and the fault, never another exception (the caller logs one line and keeps its table)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pilotfish.dns.tablefile import TableFileError, load_name_table

DEPTH = 1000  # issue 7 items 5 and 14: 1,000 levels killed `pilotfish dns`


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "text",
    [
        '{"table": ' + _nested(DEPTH) + "}",
        '{"table": {"x.example": {"ips": ' + _nested(DEPTH) + "}}}",
        '{"table": {"x.example": ' + '{"ips": ' * DEPTH + "[]" + "}" * DEPTH + "}}",
        _nested(DEPTH * 50),
    ],
    ids=["table", "ips", "objects", "top-level-50000"],
)
def test_deep_nesting_is_a_table_file_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(TableFileError) as err:
        load_name_table(str(path))
    assert str(err.value).startswith(f"{path}: ")
