"""LookupTable.build refuses a table it cannot serve, whole, with a TableError naming the entry and
the bad value (issue 7 item 6): the agent turns it into a NACK, `pilotfish dns` into one log line,
and the table in use keeps serving. Text that is merely not an IP literal is dropped, as Istio
does (the vectors depend on it)."""

from __future__ import annotations

from typing import Any

import pytest
from vectors import name_table

from pilotfish.dns.table import LookupTable, TableError

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def _build(table: Any) -> LookupTable:
    return LookupTable.build(table, "ns1", "ns1.svc.cluster.local", SEARCH)


def _entry(*ips: str) -> dict[str, Any]:
    return {"ips": list(ips), "registry": "Kubernetes", "shortname": "bad", "namespace": "ns1"}


@pytest.mark.parametrize("ip", ["10.0.0.9\x00", "\x00", "fd00::1\x00", "fe80::\x00%eth0"])
def test_an_address_inet_pton_refuses_rejects_the_table_naming_host_and_value(ip: str) -> None:
    table = name_table({"good.ns1.svc.cluster.local": _entry("10.0.0.1"),
                        "bad.ns1.svc.cluster.local": _entry("10.0.0.2", ip)})
    with pytest.raises(TableError) as err:
        _build(table.table)
    assert str(err.value).startswith(f"entry 'bad.ns1.svc.cluster.local': bad IP {ip!r} (")
    assert isinstance(err.value, ValueError)  # what the agent's NACK path expects


class _Info:
    """A NameInfo-like entry whose fields may be anything (a plain mapping's values)."""

    def __init__(self, ips: Any, registry: Any = "External") -> None:
        self.ips, self.registry, self.shortname, self.namespace, self.alt_hosts = ips, registry, "", "", ()


@pytest.mark.parametrize(
    "info,fault",
    [
        (_Info(["10.0.0.1\udcff"]), "bad IP '10.0.0.1\\udcff'"),  # a lone surrogate: UnicodeEncodeError
        (_Info([10]), "bad IP 10"),
        (_Info(None), "TypeError"),
    ],
)
def test_any_malformed_field_rejects_the_table(info: _Info, fault: str) -> None:
    with pytest.raises(TableError) as err:
        _build({"x.example": info})
    assert str(err.value).startswith("entry 'x.example': ") and fault in str(err.value)


def test_text_that_is_not_an_ip_is_dropped_as_istio_does() -> None:
    table = _build(name_table({"x.example": {"ips": ["10.0.0.0/8", "not-an-ip", "", "10.0.0.1"],
                                             "registry": "External"}}).table)
    assert table.names()["x.example."].a == (bytes([10, 0, 0, 1]),)
