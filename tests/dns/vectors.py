"""Access to Istio's recorded DNS behaviour (tests/dns/data/cases.json, see its README)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

CASES = Path(__file__).parent / "data" / "cases.json"


@cache
def all_cases() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(CASES.read_text()))


def cases(kind: str) -> list[dict[str, Any]]:
    """Every vector of one kind (`query`, `lookup_table`, `alt_hosts`, `proto_wire`, ...)."""
    return [c for c in all_cases() if c["kind"] == kind]


def distinct_tables() -> list[dict[str, Any]]:
    """Every different NameTable map among the vectors, in order of first use."""
    seen, out = set(), []
    for case in all_cases():
        table = case.get("table")
        if isinstance(table, dict) and table and json.dumps(table, sort_keys=True) not in seen:
            seen.add(json.dumps(table, sort_keys=True))
            out.append(table)
    return out


def fixture_table(name: str) -> dict[str, Any]:
    """The NameTable (proto-JSON map) shared by the cases of fixture `name`."""
    return next(c["table"] for c in all_cases() if c.get("fixture") == name and c["table"])


def name_table(table: dict[str, Any]) -> NameTable:
    """A NameTable message from a vector's map (accepts `alt_hosts` and `altHosts`)."""
    return json_format.ParseDict({"table": table}, NameTable())
