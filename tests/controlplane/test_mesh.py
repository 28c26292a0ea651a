"""The mesh file: parsing, every error a hand-written file can have, the NameTable it gives, and
stable auto-allocated ServiceEntry addresses."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from pilotfish.controlplane.mesh import (
    Mesh,
    MeshError,
    load_mesh,
    mesh_version,
    parse_mesh,
)
from pilotfish.controlplane.nametable import (
    Endpoint,
    Health,
    ProxyInfo,
    Registry,
    Resolution,
)

EXAMPLE = """\
clusterDomain: cluster.local          # optional, default cluster.local
services:                             # Kubernetes Services
  - name: productpage
    namespace: bookinfo
    clusterIPs: [10.96.12.7]
    ports: [9080]
    publishNotReadyAddresses: false
    endpoints:
      - addresses: [10.244.1.5]
  - name: mysql
    namespace: data
    clusterIP: None
    ports: [{port: 3306, name: mysql}]
    endpoints:
      - addresses: [10.244.2.10]
        hostname: mysql-0
        subdomain: mysql
      - addresses: [10.244.2.11]
        hostname: mysql-1
        subdomain: mysql
        ready: false
  - name: legacy-db
    namespace: data
    externalName: db.example.com
serviceEntries:
  - name: partner-api
    namespace: bookinfo
    hosts: [api.partner.example, "*.cdn.partner.example"]
    addresses: [240.240.0.5]
    resolution: NONE
    ports: [443]
"""

PROXY = ProxyInfo(ips=("10.244.1.9",), cluster="Kubernetes")


def _table(mesh: Mesh, proxy: ProxyInfo = PROXY) -> dict[str, Any]:
    return MessageToDict(mesh.name_table(proxy), preserving_proto_field_name=True).get("table", {})


def _error(text: str) -> str:
    with pytest.raises(MeshError) as info:
        parse_mesh(text, source="mesh.yaml")
    return str(info.value)


def test_example_parses_into_istiod_model() -> None:
    mesh = parse_mesh(EXAMPLE, source="mesh.yaml")
    by_host = {s.hostname: s for s in mesh.services}
    assert list(by_host) == [
        "productpage.bookinfo.svc.cluster.local",
        "mysql.data.svc.cluster.local",
        "legacy-db.data.svc.cluster.local",
        "api.partner.example",
        "*.cdn.partner.example",
    ]
    productpage = by_host["productpage.bookinfo.svc.cluster.local"]
    assert productpage.registry is Registry.KUBERNETES and productpage.resolution is Resolution.CLIENT_SIDE_LB
    assert productpage.cluster_vips == {"Kubernetes": ("10.96.12.7",)} and productpage.default_address == "10.96.12.7"
    assert productpage.ports == (9080,)
    assert by_host["mysql.data.svc.cluster.local"].resolution is Resolution.PASSTHROUGH
    assert by_host["legacy-db.data.svc.cluster.local"].resolution is Resolution.ALIAS
    partner = by_host["api.partner.example"]
    assert (partner.registry, partner.resolution, partner.default_address) == (Registry.EXTERNAL, Resolution.PASSTHROUGH, "240.240.0.5")
    assert mesh.endpoints["mysql.data.svc.cluster.local"] == (
        Endpoint(addresses=("10.244.2.10",), hostname="mysql-0", subdomain="mysql", cluster="Kubernetes",
                 service_account="default"),
        Endpoint(addresses=("10.244.2.11",), hostname="mysql-1", subdomain="mysql", cluster="Kubernetes",
                 health=Health.UNHEALTHY, service_account="default"),
    )


def test_example_name_table() -> None:
    assert _table(parse_mesh(EXAMPLE)) == {
        "productpage.bookinfo.svc.cluster.local": {
            "ips": ["10.96.12.7"], "registry": "Kubernetes", "shortname": "productpage", "namespace": "bookinfo",
        },
        "mysql.data.svc.cluster.local": {"ips": ["10.244.2.10"], "registry": "Kubernetes", "shortname": "mysql", "namespace": "data"},
        "mysql-0.mysql.data.svc.cluster.local": {
            "ips": ["10.244.2.10"], "registry": "Kubernetes", "shortname": "mysql-0.mysql", "namespace": "data",
        },
        "api.partner.example": {"ips": ["240.240.0.5"], "registry": "External"},
        "*.cdn.partner.example": {"ips": ["240.240.0.5"], "registry": "External"},
    }


def test_documented_example_parses() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "controlplane.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    hosts = {s.hostname for s in parse_mesh(example, source="docs/controlplane.md").services}
    assert "mysql.data.svc.cluster.local" in hosts and "*.cdn.partner.example" in hosts


def test_load_mesh_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(EXAMPLE)
    assert load_mesh(path) == parse_mesh(EXAMPLE)


def test_empty_file_is_an_empty_mesh() -> None:
    assert parse_mesh("# nothing yet\n").services == ()


def test_headless_service_per_pod_names_and_publish_not_ready() -> None:
    text = """
clusterDomain: example.internal
services:
  - name: kafka
    namespace: streams
    headless: true
    ports: [9092]
    publishNotReadyAddresses: true
    endpoints:
      - {addresses: [10.1.0.1], hostname: kafka-0, subdomain: kafka}
      - {addresses: [10.1.0.2], hostname: kafka-1, subdomain: kafka, ready: false}
      - {addresses: [10.1.0.3]}
      - {addresses: [10.2.0.1], hostname: kafka-0, subdomain: kafka, cluster: east}
"""
    table = _table(parse_mesh(text))
    assert table["kafka.streams.svc.example.internal"] == {
        "ips": ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.2.0.1"], "registry": "Kubernetes", "shortname": "kafka", "namespace": "streams",
    }
    # The proxy's own cluster wins for a pod name that exists in both.
    assert table["kafka-0.kafka.streams.svc.example.internal"]["ips"] == ["10.1.0.1"]
    assert table["kafka-1.kafka.streams.svc.example.internal"] == {
        "ips": ["10.1.0.2"], "registry": "Kubernetes", "shortname": "kafka-1.kafka", "namespace": "streams",
    }
    assert len(table) == 3
    east = _table(parse_mesh(text), ProxyInfo(cluster="east", multicluster_headless_enabled=False))
    assert east["kafka.streams.svc.example.internal"]["ips"] == ["10.2.0.1"]
    assert east["kafka-0.kafka.streams.svc.example.internal"]["ips"] == ["10.2.0.1"]


def test_external_name_gives_no_entry() -> None:
    mesh = parse_mesh("services: [{name: legacy-db, namespace: data, externalName: db.example.com, ports: [5432]}]")
    assert _table(mesh) == {}


def test_service_entry_resolution_none_with_endpoints() -> None:
    text = """
serviceEntries:
  - name: legacy-vms
    namespace: ops
    hosts: [vm.legacy.internal]
    resolution: NONE
    ports: [{number: 8080, name: http}]
    endpoints:
      - address: 192.168.10.1
      - address: 192.168.10.2
        network: branch
      - addresses: [192.168.10.3]
        ready: false
"""
    mesh = parse_mesh(text)
    assert _table(mesh) == {"vm.legacy.internal": {"ips": ["192.168.10.1", "192.168.10.2"], "registry": "External"}}
    assert _table(mesh, ProxyInfo(network="main")) == {"vm.legacy.internal": {"ips": ["192.168.10.1"], "registry": "External"}}


def test_service_entry_addresses_add_up_and_kubernetes_service_wins() -> None:
    text = """
services:
  - {name: reviews, namespace: bookinfo, clusterIPs: [10.96.0.20], ports: [9080]}
serviceEntries:
  - {name: a, namespace: ops, hosts: [db.example.com], addresses: [10.0.0.5, 10.0.0.6, 10.9.0.0/16], ports: [5432]}
  - {name: b, namespace: ops, hosts: [db.example.com], addresses: [10.0.0.7], ports: [5432]}
  - {name: decorator, namespace: bookinfo, hosts: [reviews.bookinfo.svc.cluster.local], addresses: [10.0.0.9], ports: [9080]}
"""
    table = _table(parse_mesh(text))
    assert table["db.example.com"] == {"ips": ["10.0.0.5", "10.0.0.6", "10.0.0.7"], "registry": "External"}
    assert table["reviews.bookinfo.svc.cluster.local"]["ips"] == ["10.96.0.20"]


def test_dual_stack_service_and_proxy_cluster() -> None:
    mesh = parse_mesh("services: [{name: web, namespace: ns, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [80]}]")
    dual = ProxyInfo(ips=("10.1.0.1", "fd01::1"), cluster="Kubernetes", dual_stack_enabled=True)
    assert _table(mesh, dual)["web.ns.svc.cluster.local"]["ips"] == ["10.96.0.1", "fd00::1"]
    assert _table(mesh, ProxyInfo(ips=("fd01::1",), cluster="Kubernetes"))["web.ns.svc.cluster.local"]["ips"] == ["fd00::1"]
    other = ProxyInfo(ips=("10.1.0.1", "fd01::1"), cluster="west", dual_stack_enabled=True)
    assert _table(mesh, other)["web.ns.svc.cluster.local"]["ips"] == ["10.96.0.1"]  # istiod: default only
    named = parse_mesh("clusterName: west\nservices: [{name: web, namespace: ns, clusterIPs: [10.96.0.1, 'fd00::1'], ports: [80]}]")
    assert _table(named, other)["web.ns.svc.cluster.local"]["ips"] == ["10.96.0.1", "fd00::1"]


def _se(name: str, host: str, resolution: str = "DNS") -> str:
    return f"  - {{name: {name}, namespace: ext, hosts: [{host}], resolution: {resolution}, ports: [443]}}\n"


def _auto(mesh: Mesh) -> dict[str, tuple[str, str]]:
    return {s.hostname: (s.auto_allocated_ipv4, s.auto_allocated_ipv6) for s in mesh.services if s.auto_allocated_ipv4}


def test_auto_allocation_for_dns_service_entries_used_with_dns_capture() -> None:
    mesh = parse_mesh("serviceEntries:\n" + _se("api", "api.example.com") + _se("static", "s.example.com", "STATIC")
                      + _se("none", "n.example.com", "NONE") + _se("wild", "'*.w.example.com'"))
    allocated = _auto(mesh)
    assert set(allocated) == {"api.example.com", "s.example.com"}  # not NONE, not wildcards
    v4, v6 = allocated["api.example.com"]
    assert v4.startswith("240.240.") and not v4.endswith((".0", ".255")) and v6.startswith("2001:2:0:")
    assert _table(mesh) == {}  # without DNS capture these names go upstream, as with istiod
    captured = _table(mesh, ProxyInfo(ips=("10.1.0.1",), dns_capture=True))
    assert captured["api.example.com"] == {"ips": [v4], "registry": "External"}
    assert set(captured) == {"api.example.com", "s.example.com"}


def test_auto_allocation_is_stable_when_entries_come_and_go() -> None:
    entries = [_se(f"svc-{i}", f"svc-{i}.example.com") for i in range(200)]
    before = _auto(parse_mesh("serviceEntries:\n" + "".join(entries)))
    added = _auto(parse_mesh("serviceEntries:\n" + _se("aaa-new", "aaa.example.com") + "".join(entries)))
    removed = _auto(parse_mesh("serviceEntries:\n" + "".join(entries[:50] + entries[51:])))
    reordered = _auto(parse_mesh("serviceEntries:\n" + "".join(reversed(entries))))
    assert {h: a for h, a in added.items() if h != "aaa.example.com"} == before
    assert removed == {h: a for h, a in before.items() if h != "svc-50.example.com"}
    assert reordered == before
    assert len({v4 for v4, _ in before.values()}) == len(before) == 200


def test_auto_allocation_avoids_addresses_written_in_the_file() -> None:
    first = _auto(parse_mesh("serviceEntries:\n" + _se("api", "api.example.com")))["api.example.com"]
    text = "serviceEntries:\n" + _se("api", "api.example.com")
    text += f"  - {{name: pinned, namespace: ext, hosts: [p.example.com], addresses: [{first[0]}, '{first[1]}'], ports: [443]}}\n"
    second = _auto(parse_mesh(text))["api.example.com"]
    assert second[0] != first[0] and second[1] != first[1]


def test_mesh_version_follows_content_not_layout() -> None:
    compact = "services: [{name: web, namespace: ns, clusterIPs: [10.96.0.1], ports: [80]}]"
    spread = "# the web tier\nservices:\n  - name: web\n    namespace: ns\n    clusterIPs:\n      - 10.96.0.1\n    ports: [80]\n"
    version = mesh_version(parse_mesh(compact))
    assert len(version) == 16 and version == mesh_version(parse_mesh(spread))
    assert version != mesh_version(parse_mesh(compact.replace("10.96.0.1", "10.96.0.2")))


SERVICES_3 = """\
services:
  - {name: a, namespace: ns, clusterIPs: [10.96.0.1], ports: [80]}
  - {name: b, namespace: ns, clusterIPs: [10.96.0.2], ports: [80]}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SERVICES_3 + "  - {name: c, namespace: ns, clusterIPs: [10.96.0.300]}\n",
         "mesh.yaml: services[2].clusterIPs[0]: '10.96.0.300' is not an IP address"),
        ("service: []\n",
         "mesh.yaml: unknown key 'service' (did you mean 'services'?)"),
        ("kind: Mesh\n",
         "mesh.yaml: unknown key 'kind' (expected one of clusterDomain, clusterName, services, serviceEntries, peerAuthentications, workloadGroups)"),
        ("services:\n  - {namespace: ns, clusterIPs: [10.96.0.1]}\n",
         "mesh.yaml: services[0]: 'name' is required"),
        ("services:\n  - {name: a, clusterIPs: [10.96.0.1]}\n",
         "mesh.yaml: services[0]: 'namespace' is required"),
        ("serviceEntries:\n  - {name: a, namespace: ns}\n",
         "mesh.yaml: serviceEntries[0]: 'hosts' is required (at least one host)"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: []}\n",
         "mesh.yaml: serviceEntries[0]: 'hosts' is required (at least one host)"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: ['bad host']}\n",
         "mesh.yaml: serviceEntries[0].hosts[0]: 'bad host' is not a host name (like api.example.com or *.example.com)"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], addresses: [240.240.0.1/33]}\n",
         "mesh.yaml: serviceEntries[0].addresses[0]: '240.240.0.1/33' is not an IP address or CIDR"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: 10.96.0.1, ports: [80, 70000]}\n",
         "mesh.yaml: services[0].ports[1]: 70000 is not a port number (1-65535)"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: 10.96.0.1, ports: [http]}\n",
         "mesh.yaml: services[0].ports[0]: 'http' is not a port number (1-65535)"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], ports: [{port: 443}]}\n",
         "mesh.yaml: serviceEntries[0].ports[0].port: the port number is 'number' here"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], resolution: dns}\n",
         "mesh.yaml: serviceEntries[0].resolution: unknown resolution 'dns' (expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN)"),
        (SERVICES_3 + "  - {name: a, namespace: ns, clusterIPs: [10.96.0.3], ports: [80]}\n",
         "mesh.yaml: services[2]: duplicate service ns/a (also services[0])"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], ports: [80]}\n  - {name: a, namespace: ns, hosts: [b.example], ports: [80]}\n",
         "mesh.yaml: serviceEntries[1]: duplicate serviceEntry ns/a (also serviceEntries[0])"),
        ("services:\n  - {name: a, namespace: ns, clusterIp: 10.96.0.1}\n",
         "mesh.yaml: services[0]: unknown key 'clusterIp' (did you mean 'clusterIP'?)"),
        ("services:\n  - {name: a, namespace: ns}\n",
         "mesh.yaml: services[0]: needs clusterIPs (or clusterIP: None for a headless service, or externalName)"),
        ("services:\n  - {name: Product_Page, namespace: ns, clusterIP: None}\n",
         "mesh.yaml: services[0].name: 'Product_Page' is not a Service name (a lower-case RFC 1035 label)"),
        ("services:\n  - {name: a, namespace: ns, externalName: db.example.com, clusterIP: 10.96.0.1}\n",
         "mesh.yaml: services[0].clusterIP: not allowed with externalName (an ExternalName service has no IPs)"),
        ("services:\n  - {name: a, namespace: ns, clusterIPs: [10.96.0.1, 10.96.0.2]}\n",
         "mesh.yaml: services[0].clusterIPs: at most two cluster IPs, one IPv4 and one IPv6"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: None, endpoints: [{addresses: [10.1.0.256]}], ports: [80]}\n",
         "mesh.yaml: services[0].endpoints[0].addresses[0]: '10.1.0.256' is not an IP address"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: None, endpoints: [{hostname: a-0}], ports: [80]}\n",
         "mesh.yaml: services[0].endpoints[0]: 'addresses' is required"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: None, endpoints: [{addresses: [10.1.0.1], subdomain: a}], ports: [80]}\n",
         "mesh.yaml: services[0].endpoints[0].subdomain: needs a hostname too (the pod's name is <hostname>.<subdomain>)"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: None, publishNotReadyAddresses: 'yes', ports: [80]}\n",
         "mesh.yaml: services[0].publishNotReadyAddresses: must be true or false, not 'yes'"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], resolution: STATIC, endpoints: [{address: db.example}], ports: [80]}\n",
         "mesh.yaml: serviceEntries[0].endpoints[0].address: 'db.example' is not an IP address"),
        ("services:\n  - {name: a, namespace: ns, clusterIP: None}\n",
         "mesh.yaml: services[0]: 'ports' is required (at least one port)"),
        ("serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], ports: []}\n",
         "mesh.yaml: serviceEntries[0]: 'ports' is required (at least one port)"),
        ("services: {name: a}\n",
         "mesh.yaml: services: must be a list, not a mapping"),
        ("- services\n",
         "mesh.yaml: must be a mapping, not a list"),
        ("clusterDomain: 'cluster .local'\n",
         "mesh.yaml: clusterDomain: 'cluster .local' is not a DNS domain"),
    ],
)
def test_errors_name_file_entry_and_field(text: str, message: str) -> None:
    assert _error(text) == message


def test_dns_service_entry_endpoints_may_be_host_names() -> None:
    text = "serviceEntries:\n  - {name: a, namespace: ns, hosts: [a.example], resolution: DNS, endpoints: [{address: db.example}], ports: [80]}\n"
    assert parse_mesh(text).endpoints["a.example"][0].addresses == ("db.example",)


def test_bad_yaml_names_line_and_column() -> None:
    assert _error("services:\n  - name: a\n    namespace: [ns\n") == (
        "mesh.yaml: line 4, column 1: not valid YAML: did not find expected ',' or ']'"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(MeshError) as info:
        load_mesh(tmp_path / "missing.yaml")
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"


def test_ten_thousand_services() -> None:
    """Scale: 8,000 ClusterIP services, 1,000 headless ones with 3 pods each, 1,000 DNS
    ServiceEntries (auto-allocated). Prints the timings; no assertion on them."""
    lines = ["services:"]
    for i in range(9000):
        if i % 9:
            lines.append(f"  - {{name: svc-{i}, namespace: ns-{i % 50}, clusterIPs: [10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}], ports: [80]}}")
        else:
            pods = ", ".join(f"{{addresses: [10.200.{i // 256 % 256}.{p}], hostname: db-{p}, subdomain: svc-{i}}}" for p in range(3))
            lines.append(f"  - {{name: svc-{i}, namespace: ns-{i % 50}, clusterIP: None, ports: [5432], endpoints: [{pods}]}}")
    lines.append("serviceEntries:")
    lines += [_se(f"ext-{i}", f"ext-{i}.example.com").rstrip("\n") for i in range(1000)]
    text = "\n".join(lines) + "\n"

    start = time.perf_counter()
    mesh = parse_mesh(text)
    parsed = time.perf_counter()
    table = mesh.name_table(ProxyInfo(ips=("10.1.0.1",), cluster="Kubernetes", dns_capture=True))
    built = time.perf_counter()
    wire = table.SerializeToString(deterministic=True)
    done = time.perf_counter()
    version = mesh_version(mesh)
    versioned = time.perf_counter()

    assert len(mesh.services) == 10_000
    assert len(table.table) == 10_000 + 1000 * 3
    assert len(version) == 16
    print(
        f"\n10,000 services: parse {parsed - start:.3f}s, name table {built - parsed:.3f}s "
        f"({len(table.table)} entries), serialize {done - built:.3f}s ({len(wire)} bytes), "
        f"version {versioned - done:.3f}s"
    )


DEEP = 1000  # a hostile or broken file: far deeper than the mesh format (7 levels) ever goes


@pytest.mark.parametrize("text", [
    "services: " + "[" * DEEP + "]" * DEEP + "\n",
    '{"services": ' + "[" * DEEP + "]" * DEEP + "}\n",
    "services: [" + "{a: " * DEEP + "1" + "}" * DEEP + "]\n",
], ids=["yaml-flow", "json", "yaml-mappings"])
@pytest.mark.parametrize("libyaml", [True, False], ids=["libyaml", "pure-python"])
def test_a_file_nested_1000_deep_is_one_error(text: str, libyaml: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With or without libyaml (PyYAML built without it falls back to its Python parser, whose
    composer recursed), nesting gives MeshError, never RecursionError."""
    if not libyaml:
        monkeypatch.delattr("yaml.CSafeLoader")
    message = _error(text)
    assert message.startswith("mesh.yaml: ")
    assert "\n" not in message


@pytest.mark.parametrize(("text", "fault"), [
    ("clusterName: 2020-13-45\n", "ValueError: month must be in 1..12"),
    ("clusterName: !!int abc\n", "ValueError"),
    ("clusterName: !!timestamp abc\n", "AttributeError"),
    ("clusterName: " + "9" * 5000 + "\n", "a number of 5000 characters (at most 100)"),
    ('{"clusterName": ' + "9" * 5000 + "}", "a number of 5000 characters (at most 100)"),
])
def test_a_scalar_its_constructor_cannot_make_is_a_mesh_error(text: str, fault: str) -> None:
    """PyYAML's constructors fail with ValueError and the like, not YAMLError: that was a traceback
    at start and a dead control plane on reload (hostile review of issue 7)."""
    message = _error(text)
    assert message.startswith("mesh.yaml: ") and fault in message
    assert len(message) < 300


def test_service_entry_endpoints_are_listed_once_per_host_whatever_its_addresses() -> None:
    """A host's endpoints were added once per address: 5 endpoints x 4 addresses listed 20 times,
    and 300 hosts x 300 addresses x 300 endpoints (11.7 KB of YAML) took 40 s and 5.6 GB."""
    text = """
serviceEntries:
  - name: vms
    namespace: ops
    hosts: [a.example, b.example]
    addresses: [10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4]
    resolution: STATIC
    ports: [{number: 80, name: http}]
    endpoints: [{address: 192.168.0.1}, {address: 192.168.0.2}, {address: 192.168.0.3}]
"""
    mesh = parse_mesh(text)
    for host in ("a.example", "b.example"):
        assert [e.addresses for e in mesh.endpoints[host]] == [("192.168.0.1",), ("192.168.0.2",), ("192.168.0.3",)]


@pytest.mark.parametrize("text", [
    "services: [{name: a, namespace: n, clusterIP: 10.96.0.1, ports: [80]}]\nservices: []\n",
    '{"services": [], "services": []}',
    "services:\n  - name: a\n    name: b\n    namespace: n\n    clusterIP: 10.96.0.1\n    ports: [80]\n",
])
def test_a_key_given_twice_is_an_error_not_last_wins(text: str) -> None:
    """safe_load keeps the last value: a second `services:` block dropped the first silently."""
    message = _error(text)
    assert "found duplicate key" in message and "line " in message


def test_a_base_60_number_of_any_length_is_refused_at_once() -> None:
    """PyYAML reads YAML 1.1 base-60 integers in quadratic time (600 KB: 11 s, a reload stuck)."""
    message = _error("clusterName: 1" + ":59" * 100_000 + "\n")
    assert "a number of 300001 characters (at most 100)" in message


def test_merge_keys_that_copy_without_end_are_refused() -> None:
    """Each mapping merging the one before copies all of it again: 107 KB took 1.2 GB."""
    lines = ["x0: &a0 {" + ", ".join(f"k{i}: {i}" for i in range(300)) + "}"]
    lines += [f"x{n}: &a{n} {{<<: *a{n - 1}, m{n}: 1}}" for n in range(1, 5000)]
    message = _error("\n".join(lines) + "\n")
    assert "merge keys copy more than 1000000 entries in all" in message


def test_a_mesh_file_over_64_mib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """libyaml (one scalar) and json.loads (one file) hold the GIL for their whole input, so
    SIGTERM waited 15 s on a 300 MB file: the bound keeps the worst near a second."""
    path = tmp_path / "mesh.json"
    with path.open("wb") as f:
        f.truncate((64 << 20) + 1)  # sparse: its size is what is checked first
    with pytest.raises(MeshError, match="cannot read"):
        load_mesh(path)


def test_json_too_large_to_read_at_once_goes_through_the_stoppable_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import pilotfish.controlplane.document as document

    text = '{"clusterName": "c1", "services": [{"name": "a", "namespace": "n", "clusterIP": "10.96.0.1", "ports": [80]}]}'
    at_once = parse_mesh(text)
    monkeypatch.setattr(document, "JSON_AT_ONCE", 10)
    monkeypatch.setattr(document.json, "loads", None)  # must not be called
    assert parse_mesh(text) == at_once


SIDECAR_MESH = """\
services:
  - name: reviews
    namespace: bookinfo
    clusterIP: 10.96.0.21
    ports:
      - {port: 9080, name: http, targetPort: 8080}
      - {port: 9090, name: grpc-api}
      - {port: 5432, name: db, appProtocol: tcp}
      - {port: 8443, appProtocol: kubernetes.io/h2c}
      - 7000
    endpoints:
      - {addresses: [10.244.1.7], serviceAccount: bookinfo-reviews}
serviceEntries:
  - name: api
    namespace: bookinfo
    hosts: [api.example]
    ports: [{number: 80, name: web, protocol: HTTP}, {number: 443, name: https, protocol: TLS}]
peerAuthentications:
  - {name: default, namespace: istio-system, mtls: {mode: STRICT}}
  - {name: default, namespace: legacy, mtls: {mode: PERMISSIVE}}
  - {name: default, namespace: bookinfo, mtls: {mode: UNSET}}
"""


def test_ports_carry_istios_protocol_and_the_target_port() -> None:
    mesh = parse_mesh(SIDECAR_MESH)
    reviews, api = mesh.services
    assert reviews.ports == (9080, 9090, 5432, 8443, 7000)
    assert [(p.port, p.protocol, p.target_port) for p in reviews.port_specs] == [
        (9080, "HTTP", 8080), (9090, "HTTP2", 9090), (5432, "TCP", 5432), (8443, "HTTP2", 8443), (7000, "TCP", 7000)]
    assert [(p.port, p.protocol) for p in api.port_specs] == [(80, "HTTP"), (443, "TCP")]
    assert mesh.endpoints[reviews.hostname][0].service_account == "bookinfo-reviews"


def test_peer_authentication_as_istio_layers_it() -> None:
    mesh = parse_mesh(SIDECAR_MESH)
    assert mesh.mtls_mode("legacy") == "PERMISSIVE"
    assert mesh.mtls_mode("bookinfo") == "STRICT"  # UNSET: the mesh's
    assert mesh.mtls_mode("other") == "STRICT"
    assert parse_mesh("services: []").mtls_mode("any") == "PERMISSIVE"  # Istio's default


@pytest.mark.parametrize(("text", "words"), [
    ("peerAuthentications: [{namespace: a, mtls: {mode: ENABLED}}]", "peerAuthentications[0].mtls.mode: unknown mode 'ENABLED'"),
    ("peerAuthentications: [{namespace: a}, {namespace: a}]", "peerAuthentications[1]: a second PeerAuthentication"),
    ("services: [{name: a, namespace: b, clusterIP: 10.96.0.1, ports: [{port: 80, targetPort: http}]}]",
     "services[0].ports[0].targetPort: 'http' is not a port number"),
    ("services: [{name: a, namespace: b, clusterIP: 10.96.0.1, ports: [80], endpoints: "
     "[{addresses: [10.0.0.1], serviceAccount: Bad_SA}]}]", "endpoints[0].serviceAccount: 'Bad_SA'"),
])
def test_sidecar_fields_are_checked(text: str, words: str) -> None:
    assert words in _error(text)
