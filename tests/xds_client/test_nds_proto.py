"""The committed NDS module is wire compatible with Istio's NameTable (proto_wire vectors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from pilotfish.xds_client.proto.istio.networking.nds.v1.nds_pb2 import NameTable

VECTORS = [
    c for c in json.loads((Path(__file__).parents[1] / "dns" / "data" / "cases.json").read_text())
    if c["kind"] == "proto_wire"
]


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["name"])
def test_encoding_matches_istio(case: dict) -> None:
    table = json_format.ParseDict({"table": case["table"]}, NameTable())
    assert table.SerializeToString(deterministic=True).hex() == case["expect"]["hex"]


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["name"])
def test_decoding_matches_istio(case: dict) -> None:
    table = NameTable.FromString(bytes.fromhex(case["expect"]["hex"]))
    assert json_format.MessageToDict(table, preserving_proto_field_name=True)["table"] == case["table"]


def test_type_url_and_field_numbers() -> None:
    assert f"type.googleapis.com/{NameTable.DESCRIPTOR.full_name}" == VECTORS[0]["expect"]["type_url"]
    info = NameTable.DESCRIPTOR.nested_types_by_name["NameInfo"]
    assert {f.name: f.number for f in info.fields} == {
        "ips": 1, "registry": 2, "shortname": 3, "namespace": 4, "alt_hosts": 5,
    }
    assert NameTable.DESCRIPTOR.fields_by_name["table"].number == 1
