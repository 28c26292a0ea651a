"""The lookup table against Istio's dumps of its own (lookup_table and alt_hosts vectors), and
pilotfish's deliberate extension of the search-domain fast path."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from vectors import cases, fixture_table, name_table

from pilotfish.dns.table import LookupTable, debug_view, parse_ips, proxy_domain_parts

SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


def _ips(rdatas: tuple[bytes, ...]) -> list[str]:
    """Text form as Go prints it (an IPv4-mapped IPv6 address as a dotted quad)."""
    out = []
    for r in rdatas:
        ip = ipaddress.ip_address(r)
        mapped = getattr(ip, "ipv4_mapped", None)
        out.append(str(mapped or ip))
    return out


def _istio_view(table: LookupTable) -> tuple[set[str], dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """All names, A map, AAAA map and CNAME map, in the shape of Istio's LookupTable dump."""
    cnames = table.expanded_names()
    a = {n: _ips(v.a) for n, v in table.names().items() if v.a}
    aaaa = {n: _ips(v.aaaa) for n, v in table.names().items() if v.aaaa}
    return set(table.names()) | set(cnames), a, aaaa, cnames


@pytest.mark.parametrize("case", cases("lookup_table"), ids=lambda c: c["fixture"])
def test_lookup_table_matches_istio_with_first_search_domain(case: dict) -> None:
    """Istio expands with search[0] only; restricted to it, pilotfish's names are Istio's."""
    cfg = case["proxy_config"]
    table = LookupTable.build(
        name_table(case["table"]).table, cfg["proxy_namespace"], cfg["proxy_domain"], cfg["search_domains"][:1]
    )
    names, a, aaaa, cnames = _istio_view(table)
    expect = case["expect"]
    assert names == set(expect["all_hosts"])
    assert a == expect["a_records"]
    assert aaaa == expect["aaaa_records"]
    assert cnames == expect["cname"]


def test_every_search_domain_expands_absolute_names_only() -> None:
    """The improvement: search[1:] expand hostnames and alt hosts, never the namespace-relative
    short forms, which are not Kubernetes names under another search domain."""
    table = LookupTable.build(name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local", SEARCH)
    first_only = LookupTable.build(name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local", SEARCH[:1])
    extra = set(table.expanded_names()) - set(first_only.expanded_names())
    assert "www.google.com.svc.cluster.local." in extra
    assert "www.google.com.cluster.local." in extra
    assert "*.wildcard.cluster.local." in extra
    assert "details.ns2.svc.cluster.remote.svc.cluster.local." in extra
    assert not any(n.startswith(("productpage.svc.", "productpage.ns1.svc.cluster.", "example.ns2.svc.cluster.local.")) for n in extra)
    assert table.resolve("productpage.svc.cluster.local.") is None
    match = table.resolve("www.google.com.cluster.local.")
    assert match is not None and match.cname == "www.google.com." and _ips(match.a) == ["1.1.1.1"]


def test_search_domain_trailing_dot_expands_own_namespace_fqdns_as_istio() -> None:
    """Istio expands own-namespace FQDNs when search[0] ends in '.'; so does pilotfish (see
    test_heldout_vectors.py)."""
    table = LookupTable.build(
        name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local", [s + "." for s in SEARCH]
    )
    match = table.resolve("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.")
    assert match is not None and match.cname == "productpage.ns1.svc.cluster.local."
    assert table.resolve("www.google.com.ns1.svc.cluster.local.") is not None


def test_wildcard_walk_picks_the_nearest_enclosing_pattern() -> None:
    table = LookupTable.build(name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local", SEARCH)
    assert _ips(table.lookup(["x", "y", "b", "wildcard"]).a) == ["11.11.11.11"]
    assert _ips(table.lookup(["b", "wildcard"]).a) == ["10.10.10.10"]
    assert table.lookup(["wildcard"]) is None  # the apex is not matched
    expanded = table.lookup(["foo", "wildcard", "ns1", "svc", "cluster", "local"])
    assert expanded.cname == "*.wildcard."


def test_conflicting_aliases_merge_per_family() -> None:
    """Istio overwrites A and AAAA separately, so a v4-only and a v6-only entry sharing an alias
    both answer; the later entry wins a family both have."""
    table = LookupTable.build(
        name_table({
            "a.ns1.svc.cluster.local": {"ips": ["10.0.0.1"], "registry": "Kubernetes", "shortname": "a", "namespace": "ns1"},
            "a.ns1": {"ips": ["fd00::1"], "registry": "External"},
        }).table,
        "ns1", "ns1.svc.cluster.local", SEARCH,
    )
    merged = table.names()["a.ns1."]
    assert _ips(merged.a) == ["10.0.0.1"] and _ips(merged.aaaa) == ["fd00::1"]
    assert not merged.relative  # an absolute name somewhere keeps it expandable everywhere


@pytest.mark.parametrize("case", cases("alt_hosts"), ids=lambda c: c["name"])
def test_debug_view_matches_istio(case: dict) -> None:
    cfg = case["proxy_config"]
    view = debug_view(name_table(case["table"]).table, cfg["proxy_namespace"], cfg["proxy_domain"])
    prefix = case["name"].split("'")[1]
    assert sorted(k for k in view if k.startswith(prefix)) == sorted(case["expect"]["keys_with_prefix"])


def test_debug_view_extra_keys_copy_ips_canonically() -> None:
    view = debug_view(name_table(fixture_table("istio_test")).table, "ns1", "ns1.svc.cluster.local")
    assert view["dual.localhost."] == {"ips": ["2.2.2.2", "2001:db8::ff00:42:8329"], "registry": "Kubernetes"}
    assert view["productpage."]["registry"] == "Kubernetes"


def test_parse_ips_keeps_literals_only() -> None:
    a, aaaa = parse_ips(["1.2.3.4", "10.0.0.0/8", "host.example", "::ffff:1.2.3.4", "fe80::1%eth0", "01.2.3.4", ""])
    assert a == (socket.inet_aton("1.2.3.4"),)
    assert [str(ipaddress.ip_address(x)) for x in aaaa] == ["::ffff:102:304", "fe80::1"]


@pytest.mark.parametrize(
    "namespace,domain,expect",
    [
        ("ns1", "ns1.svc.cluster.local", ("svc.cluster.local", "svc")),
        ("ns1", "svc.cluster.local", ("svc.cluster.local", "svc")),
        ("ns1", "cluster.local", ("cluster.local", "cluster")),
        ("ns1", "", ("", "")),
    ],
)
def test_proxy_domain_parts(namespace: str, domain: str, expect: tuple[str, str]) -> None:
    assert proxy_domain_parts(namespace, domain) == expect


def test_kubernetes_entry_outside_the_proxy_domain_gets_its_fqdn_only() -> None:
    table = LookupTable.build(
        name_table({"svc.ns1.svc.cluster.remote": {"ips": ["10.1.1.1"], "registry": "Kubernetes", "shortname": "svc", "namespace": "ns1", "alt_hosts": ["svc.alt"]}}).table,
        "ns1", "ns1.svc.cluster.local", SEARCH,
    )
    assert set(table.names()) == {"svc.ns1.svc.cluster.remote."}


def test_root_name_is_never_an_alias() -> None:
    table = LookupTable.build(
        name_table({"x.svc.cluster.local": {"ips": ["10.1.1.1"], "registry": "Kubernetes", "namespace": ""}}).table,
        "", ".svc.cluster.local", SEARCH,
    )
    assert "." not in table.names()
