"""The agent's settings from pilot-agent's environment: discovery address, TLS root and name,
node identity, DNS switch, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from hostile import billion_laughs
from prometheus_client import CollectorRegistry

from pilotfish.agent.config import agent_config, server_name, xds_root
from pilotfish.agent.files import MISSING
from pilotfish.agent.status import DNS_NOT_READY, StatusSources, handle
from pilotfish.common.settings import ConfigError

ROOT = "./var/run/secrets/istio/root-cert.pem"
BASE = {"POD_NAME": "productpage-v1-abc", "POD_NAMESPACE": "bookinfo", "INSTANCE_IP": "10.244.1.5",
        "SERVICE_ACCOUNT": "bookinfo-productpage", "ISTIO_META_CLUSTER_ID": "Kubernetes"}


LAUGHS = billion_laughs()


def _config(env: dict[str, str], **kw: object):  # type: ignore[no-untyped-def]
    return agent_config({**BASE, **env}, root_problem=present({ROOT}), cache_problem=lambda p: None, **kw)  # type: ignore[arg-type]


def present(paths: set[str]) -> Callable[[str], str | None]:
    """A root-certificate check for which `paths` are usable files and nothing else exists."""
    return lambda path: None if path in paths else MISSING


def test_defaults_are_istios() -> None:
    config = _config({})
    assert config.discovery_address == "istiod.istio-system.svc:15012"
    assert config.server_name == "istiod.istio-system.svc"
    assert config.root_cert == ROOT and config.status == ("", 15020)
    assert config.node_id == "sidecar~10.244.1.5~productpage-v1-abc.bookinfo~bookinfo.svc.cluster.local"
    assert config.token_file == "./var/run/secrets/tokens/istio-token" and config.cluster_id == "Kubernetes"
    assert not config.dns_enabled


def test_discovery_address_precedence() -> None:
    pc = '{"discoveryAddress": "pc.example:15012"}'
    assert _config({"PROXY_CONFIG": pc}).discovery_address == "pc.example:15012"
    assert _config({"PROXY_CONFIG": pc, "PILOT_DISCOVERY_ADDRESS": "env.example:15012"}).discovery_address == "env.example:15012"
    assert _config({"PILOT_DISCOVERY_ADDRESS": "env.example:15012"}, discovery="flag.example:1").discovery_address == "flag.example:1"


def test_json_proxy_config_does_not_load_yaml() -> None:
    """Istio's injector writes PROXY_CONFIG as JSON; parsing it must not import PyYAML (memory)."""
    code = ("import sys; from pilotfish.agent.meshconfig import ConfigSources, effective_proxy_config; "
            "assert effective_proxy_config(ConfigSources(env='{\"discoveryAddress\": \"a:1\"}')) "
            "== {'discoveryAddress': 'a:1'}; "
            "print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_server_name() -> None:
    assert server_name("localhost:15012", {}) == "istiod.istio-system.svc"
    assert server_name("istiod-canary.istio-system.svc:15012", {}) == "istiod-canary.istio-system.svc"
    assert server_name("10.0.0.1:15012", {"ISTIOD_SAN": "istiod.istio-system.svc"}) == "istiod.istio-system.svc"


@pytest.mark.parametrize("env,pc,usable,expect", [
    ({"XDS_ROOT_CA": "SYSTEM"}, {}, set(), "SYSTEM"),
    ({"XDS_ROOT_CA": "/x/root.pem"}, {}, {"/x/root.pem"}, "/x/root.pem"),
    ({}, {}, {"./etc/certs/root-cert.pem", ROOT}, "./etc/certs/root-cert.pem"),
    ({"PROV_CERT": "/prov"}, {}, set(), "/prov/root-cert.pem"),
    ({}, {}, {ROOT}, ROOT),
    ({}, {"controlPlaneAuthPolicy": "NONE"}, set(), None),
])
def test_xds_root_in_istios_order(env: dict[str, str], pc: dict[str, object], usable: set[str], expect: str | None) -> None:
    assert xds_root(env, pc, present(usable)) == expect


def test_missing_root_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="root CA file for XDS does not exist: ./var/run/secrets/istio/root-cert.pem"):
        xds_root({}, {}, present(set()))
    with pytest.raises(ConfigError, match="XDS_ROOT_CA: root CA file for XDS does not exist: /nope"):
        xds_root({"XDS_ROOT_CA": "/nope"}, {}, present(set()))


@pytest.mark.parametrize("env,path,setting", [
    ({"XDS_ROOT_CA": "/x/root.pem"}, "/x/root.pem", "XDS_ROOT_CA"),
    ({}, "./etc/certs/root-cert.pem", "legacy mounted root"),
    ({"PROV_CERT": "/prov"}, "/prov/root-cert.pem", "PROV_CERT"),
    ({"FILE_MOUNTED_CERTS": "true", "ISTIO_META_TLS_CLIENT_ROOT_CERT": "/f/root.pem"}, "/f/root.pem",
     "ISTIO_META_TLS_CLIENT_ROOT_CERT"),
    ({}, ROOT, "XDS_ROOT_CA (unset: the default)"),
])
def test_unusable_root_is_an_error_naming_the_setting_and_the_path(env: dict[str, str], path: str, setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        xds_root(env, {}, lambda p: "is a directory" if p == path else MISSING)
    assert str(err.value) == f"{setting}: root CA file for XDS is a directory: {path}"


def test_missing_prov_cert_root_is_accepted_as_in_istio() -> None:
    assert xds_root({"PROV_CERT": "/prov"}, {}, present(set())) == "/prov/root-cert.pem"


def test_dns_switch_and_metadata() -> None:
    config = _config({"ISTIO_META_DNS_CAPTURE": "true", "ISTIO_META_MESH_ID": "mesh1",
                      "PROXY_CONFIG": "proxyMetadata:\n  ISTIO_META_MESH_ID: from-pc\n  ISTIO_META_FOO: bar\n"})
    assert config.dns_enabled
    assert config.metadata["MESH_ID"] == "mesh1" and config.metadata["FOO"] == "bar"
    assert config.metadata["NAMESPACE"] == "bookinfo" and config.metadata["DNS_CAPTURE"] == "true"
    assert config.metadata["INSTANCE_IPS"] == "10.244.1.5"
    assert _config({"ISTIO_META_DNS_CAPTURE": "true"}, proxy_type="router").dns_enabled is False
    assert _config({"ISTIO_META_ENABLE_DNS_SERVER": "true"}, proxy_type="router").dns_enabled


def test_xds_headers() -> None:
    assert _config({"XDS_HEADER_X_ENV": "prod"}).xds_headers == (("X_ENV", "prod"),)


@pytest.mark.parametrize("env,kw,message", [
    ({"ISTIO_META_DNS_CAPTURE": "yes"}, {}, "ISTIO_META_DNS_CAPTURE: invalid boolean 'yes'"),
    ({"INSTANCE_IP": "10.0.0.300"}, {}, "INSTANCE_IP: not an IP address: '10.0.0.300'"),
    ({"PILOT_DISCOVERY_ADDRESS": "istiod"}, {}, "PILOT_DISCOVERY_ADDRESS: invalid address 'istiod'"),
    ({"PROXY_CONFIG": "[1, 2"}, {}, "PROXY_CONFIG: not YAML or JSON"),
    ({"PROXY_CONFIG": "- a\n- b"}, {}, "PROXY_CONFIG: want an object"),
    ({"PROXY_CONFIG": "[" * 5000 + "]" * 5000}, {}, "PROXY_CONFIG: nested too deeply"),
    ({"PROXY_CONFIG": "a: " + "[" * 5000 + "]" * 5000}, {}, "PROXY_CONFIG: nested too deeply"),
    ({"PROXY_CONFIG": "a:\n  " + "- " * 5000 + "x\n"}, {}, "PROXY_CONFIG: nested too deeply"),
    ({"PROXY_CONFIG": '{"statusPort": 70000}'}, {}, "status port: want 0-65535, got 70000"),
    # PyYAML's constructors raise plain ValueError / IndexError for these, not YAMLError
    ({"PROXY_CONFIG": "a: 2001-13-45"}, {}, "PROXY_CONFIG: not YAML or JSON: ValueError: month must be in 1..12"),
    ({"PROXY_CONFIG": 'x: !!int ""'}, {}, "PROXY_CONFIG: not YAML or JSON: IndexError"),
    ({"PROXY_CONFIG": "x: !!float abc"}, {}, "PROXY_CONFIG: not YAML or JSON: ValueError"),
    ({"PROXY_CONFIG": "x: " + "9" * 5000}, {}, "PROXY_CONFIG: not YAML or JSON: ValueError: Exceeds the limit"),
    ({"PROXY_CONFIG": "statusPort: 0x" + "f" * 5000}, {}, "PROXY_CONFIG: statusPort: want a string or a number, got int"),
    ({"PROXY_CONFIG": "discoveryAddress: [a, b]"}, {}, "PROXY_CONFIG: discoveryAddress: want a string or a number, got list"),
    ({"PROXY_CONFIG": "proxyMetadata: [a]"}, {}, "PROXY_CONFIG: proxyMetadata: want a map of at most 1024 strings, got list"),
    ({"PROXY_CONFIG": LAUGHS}, {}, "PROXY_CONFIG: proxyMetadata: want a string or a number, got list"),
    ({}, {"proxy_type": "ztunnel"}, "proxy type: want one of sidecar, router, waypoint, got 'ztunnel'"),
    # gRPC refuses these at every stream (or, undecodable bytes, raises and the agent dies)
    ({"XDS_HEADER_FOO": "a\nb"}, {}, "XDS_HEADER_FOO: not a valid gRPC header value (printable ASCII): 'a\\nb'"),
    ({"XDS_HEADER_FOO": "\udcff"}, {}, "XDS_HEADER_FOO: not a valid gRPC header value"),
    ({"XDS_HEADER_BAD NAME": "x"}, {}, "XDS_HEADER_BAD NAME: not a valid gRPC header name: 'BAD NAME'"),
    ({"ISTIO_META_CLUSTER_ID": "k\x00"}, {}, "ISTIO_META_CLUSTER_ID: not a valid gRPC header value"),
])
def test_bad_values_name_the_variable(env: dict[str, str], kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(env, **kw)
    assert message in str(err.value)


def _sources(reason: str | None, table: dict | None = None) -> tuple[StatusSources, list[str]]:
    quits: list[str] = []
    return StatusSources(lambda: reason, CollectorRegistry(), lambda: table, lambda: quits.append("q")), quits


def test_status_routes() -> None:
    sources, quits = _sources(DNS_NOT_READY)
    not_ready = handle("GET", "/healthz/ready", False, sources)
    assert not_ready.status == 503 and not_ready.body == DNS_NOT_READY.encode()
    assert handle("GET", "/healthz/ready", False, _sources(None)[0]).status == 200
    assert handle("GET", "/debug/ndsz", False, sources).status == 403
    assert handle("GET", "/debug/pprof/", False, sources).status == 403  # every /debug/ path
    assert handle("POST", "/quitquitquit", False, sources).status == 403 and not quits
    assert handle("GET", "/debug/ndsz", True, sources).status == 404
    assert handle("GET", "/debug/ndsz", True, _sources(None, {"a.": {}})[0]).body == b'{\n  "table": {\n    "a.": {}\n  }\n}'
    assert handle("GET", "/quitquitquit", True, sources).status == 405 and not quits
    assert handle("POST", "/quitquitquit", True, sources).status == 200 and quits == ["q"]
    assert handle("GET", "/nope", True, sources).status == 404


@pytest.mark.parametrize("env,flag,setting,path", [
    ({}, None, "PILOTFISH_NAMETABLE_CACHE (unset: the default)", "./var/lib/istio/data/nametable.pb"),
    ({"PILOTFISH_NAMETABLE_CACHE": "/data/t.pb"}, None, "PILOTFISH_NAMETABLE_CACHE", "/data/t.pb"),
    ({"PILOTFISH_NAMETABLE_CACHE": "/data/t.pb"}, "/flag/t.pb", "--nametable-cache", "/flag/t.pb"),
])
def test_saved_table_path_no_save_can_use_is_an_error(env: dict[str, str], flag: str | None, setting: str, path: str) -> None:
    with pytest.raises(ConfigError) as err:
        agent_config({**BASE, **env}, nametable_cache=flag, root_problem=present({ROOT}),
                     cache_problem=lambda p: "is a directory" if p == path else None)
    assert str(err.value) == f"{setting}: the saved name table's path is a directory: {path}"
    config = agent_config({**BASE, **env, "PILOTFISH_NAMETABLE_CACHE": ""}, root_problem=present({ROOT}),
                          cache_problem=lambda p: "is a directory")
    assert config.nametable_cache == ""  # off: nothing to check
