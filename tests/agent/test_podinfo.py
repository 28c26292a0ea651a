"""The pod's downward API files (labels, annotations) and the ProxyConfig sources in Istio's order."""

from __future__ import annotations

import pytest

from pilotfish.agent.downward import DownwardError, go_unquote, parse_downward
from pilotfish.agent.meshconfig import ConfigSources, effective_proxy_config
from pilotfish.agent.nodemeta import NodeInputs, node_facts
from pilotfish.common.settings import ConfigError


@pytest.mark.parametrize("quoted,value", [
    ('"plain"', "plain"),
    ('"a\\"b\\\\c"', 'a"b\\c'),
    ('"line\\nnext\\t"', "line\nnext\t"),
    ('"\\xc3\\xa9"', "é"),
    ('"\\303\\251"', "é"),
    ('"\\u00e9\\U0001F600"', "é\U0001F600"),
    ('"{\\"proxyMetadata\\":{}}"', '{"proxyMetadata":{}}'),
])
def test_go_quoted_values_unquote_as_go(quoted: str, value: str) -> None:
    assert go_unquote(quoted) == value


@pytest.mark.parametrize("bad", ['plain', '"open', '"a"b"', '"\\q"', '"\\x4"', '"\\400"', '"\\ud800"', '"end\\"'])
def test_values_go_would_refuse_are_refused(bad: str) -> None:
    with pytest.raises(DownwardError):
        go_unquote(bad)


def test_downward_file_lines() -> None:
    text = 'app="hello"\nversion="v1"\nno equals sign\nsidecar.istio.io/status="{\\"a\\":1}"\n'
    assert parse_downward(text) == {"app": "hello", "version": "v1", "sidecar.istio.io/status": '{"a":1}'}
    with pytest.raises(DownwardError, match="line 2"):
        parse_downward('a="1"\nb=unquoted\n')


def test_proxy_config_precedence_and_metadata_merge() -> None:
    sources = ConfigSources(
        mesh="defaultConfig:\n  discoveryAddress: mesh:15012\n  concurrency: 2\n  proxyMetadata: {A: mesh, B: mesh}\n",
        env='{"concurrency": 4, "proxyMetadata": {"B": "env"}, "extraStatTags": ["request_host"]}',
        annotations={"proxy.istio.io/config": "proxyMetadata:\n  C: anno\n",
                     "status.sidecar.istio.io/port": "15999"})
    pc = effective_proxy_config(sources)
    assert pc["discoveryAddress"] == "mesh:15012" and pc["concurrency"] == 4 and pc["statusPort"] == "15999"
    assert pc["proxyMetadata"] == {"A": "mesh", "B": "env", "C": "anno"}
    assert pc["extraStatTags"] == ["request_host"]


def test_a_bad_source_is_named() -> None:
    with pytest.raises(ConfigError, match="mesh config file m: defaultConfig: want an object"):
        effective_proxy_config(ConfigSources(mesh="defaultConfig: [1]", mesh_path="m"))
    with pytest.raises(ConfigError, match="annotation proxy.istio.io/config: not YAML or JSON"):
        effective_proxy_config(ConfigSources(annotations={"proxy.istio.io/config": "a: [1"}))
    with pytest.raises(ConfigError, match="PROXY_CONFIG: extraStatTags: want a list"):
        effective_proxy_config(ConfigSources(env='{"extraStatTags": "request_host"}'))


def test_node_metadata_as_get_node_metadata() -> None:
    env = {"POD_NAME": "hello-1", "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": "sa", "ISTIO_META_MESH_ID": "m",
           "ISTIO_METAJSON_LABELS": '{"static": "yes"}'}
    facts = node_facts(NodeInputs(env, {"serviceCluster": "istio-proxy"}, ["10.0.0.2", "10.0.0.2", "fd00::2"],
                                  "istiod.istio-system.svc",
                                  labels={"app": "hello", "pod-template-hash": "abc", "istio-locality": "r1.z1"},
                                  annotations={"a": "b"}))
    meta = facts.metadata
    assert facts.cluster == "hello.default" and facts.locality == ("r1", "z1", "")
    assert meta["LABELS"] == {"static": "yes", "app": "hello", "istio-locality": "r1/z1"}
    assert meta["INSTANCE_IPS"] == "10.0.0.2,fd00::2" and meta["PILOT_SAN"] == ["istiod.istio-system.svc"]
    assert meta["MESH_ID"] == "m" and meta["ANNOTATIONS"] == {"a": "b"} and meta["ENVOY_STATUS_PORT"] == 15021
    assert meta["NAME"] == "hello-1" and meta["NAMESPACE"] == "default" and meta["SERVICE_ACCOUNT"] == "sa"
