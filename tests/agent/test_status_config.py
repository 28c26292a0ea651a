"""The status port's pure parts: ISTIO_KUBE_APP_PROBERS and ISTIO_PROMETHEUS_ANNOTATIONS as
pilot-agent checks them (a bad value is a ConfigError naming the variable and the probe), where
probes go and come from, kubelet's redirect rules, and Istio's metrics content negotiation."""

from __future__ import annotations

import json

import pytest

from pilotfish.agent.appprobe import (AppProbe, Follow, Grpc, HttpGet, TcpSocket, after_answer, app_probe_config,
                                      parse_app_probers, probe_addresses)
from pilotfish.agent.metricsmerge import (OPENMETRICS_0_0_1, OPENMETRICS_1_0_0, TEXT, MetricsConfig, Target,
                                          accept_for_target, answer_format, merge, merged_format, metrics_config,
                                          strip_eof)
from pilotfish.agent.status import parse_request
from pilotfish.common.settings import ConfigError

LIVEZ = "/app-health/web/livez"


def test_probers_parse_as_pilot_agent_reads_them() -> None:
    probes = parse_app_probers(json.dumps({
        LIVEZ: {"httpGet": {"path": "healthz", "port": 8080, "scheme": "HTTPS",
                            "httpHeaders": [{"name": "X-A", "value": "b"}]}, "timeoutSeconds": 3},
        "/app-health/web/readyz": {"tcpSocket": {"port": 8081}},
        "/app-lifecycle/web/prestopz": {"grpc": {"port": 9090, "service": "svc"}, "unknownField": 1},
    }))
    assert probes == {
        LIVEZ: AppProbe(HttpGet("/healthz", 8080, True, (("X-A", "b"),)), 3.0),
        "/app-health/web/readyz": AppProbe(TcpSocket(8081), 1.0),  # kubelet's default timeout
        "/app-lifecycle/web/prestopz": AppProbe(Grpc(9090, "svc"), 1.0),
    }
    assert parse_app_probers("") == {}


@pytest.mark.parametrize("value,message", [
    ("{", "ISTIO_KUBE_APP_PROBERS: not JSON"),
    ("[1]", "ISTIO_KUBE_APP_PROBERS: want a JSON object"),
    ("[" * 100000, "ISTIO_KUBE_APP_PROBERS: not JSON"),
    (json.dumps({"/app-health/web/other": {"tcpSocket": {"port": 1}}}),
     "ISTIO_KUBE_APP_PROBERS: '/app-health/web/other': invalid path"),
    (json.dumps({"/app-health/web/livez\n": {"tcpSocket": {"port": 1}}}), "invalid path"),
    (json.dumps({"/app-health/a/b/livez": {"tcpSocket": {"port": 1}}}), "invalid path"),
    (json.dumps({LIVEZ: {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}),
     f"ISTIO_KUBE_APP_PROBERS: '{LIVEZ}': invalid prober type"),
    (json.dumps({LIVEZ: {"timeoutSeconds": 1}}), "invalid prober type"),
    (json.dumps({LIVEZ: {"httpGet": {"port": "http"}}}), f"'{LIVEZ}': httpGet: port: want a number, got 'http'"),
    (json.dumps({LIVEZ: {"tcpSocket": {"port": "8080"}}}), "tcpSocket: port: want a number"),
    (json.dumps({LIVEZ: {"tcpSocket": {"port": True}}}), "tcpSocket: port: want a number"),
    (json.dumps({LIVEZ: {"grpc": {"port": 70000}}}), "grpc: port: out of range"),
    (json.dumps({LIVEZ: {"tcpSocket": {"port": 1}, "timeoutSeconds": "1"}}), "timeoutSeconds"),
    (json.dumps({LIVEZ: {"httpGet": {"port": 1, "scheme": "FTP"}}}), "scheme: want HTTP or HTTPS"),
    (json.dumps({LIVEZ: {"httpGet": {"port": 1, "path": "/a\r\nX: y"}}}), "path: want a URL path"),
    (json.dumps({LIVEZ: {"httpGet": {"port": 1, "httpHeaders": [{"name": "A", "value": "b\nc"}]}}}), "httpHeaders"),
])
def test_bad_probers_name_the_variable_and_the_probe(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_app_probers(value)
    assert message in str(err.value)


@pytest.mark.parametrize("instance_ip,legacy,expected", [
    ("10.1.2.3", False, ("10.1.2.3", "127.0.0.6")),
    ("10.1.2.3", True, ("127.0.0.1", "127.0.0.6")),
    ("fd00::5", False, ("fd00::5", "::6")),
    ("fd00::5", True, ("::1", "::6")),
    ("fe80::5", False, ("fe80::5", "127.0.0.6")),  # link-local is not an IPv6 pod (pilot-agent's rule)
    ("", False, ("127.0.0.1", "127.0.0.6")),
])
def test_probe_addresses(instance_ip: str, legacy: bool, expected: tuple[str, str]) -> None:
    assert probe_addresses(instance_ip, legacy) == expected


def test_legacy_localhost_setting_is_a_boolean() -> None:
    env = {"INSTANCE_IP": "10.1.2.3", "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION": "true"}
    assert app_probe_config(env).destination == "127.0.0.1"
    with pytest.raises(ConfigError, match="REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"):
        app_probe_config({**env, "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION": "yes"})


FIRST = "http://10.1.2.3:8080/healthz"


@pytest.mark.parametrize("status,location,redirects,verdict", [
    (200, None, 0, None),
    (503, None, 0, None),
    (302, "/other", 0, Follow("http://10.1.2.3:8080/other", keep_host=True)),
    (307, "https://10.1.2.3:8443/x", 3, Follow("https://10.1.2.3:8443/x", keep_host=False)),
    (301, "http://example.com/", 0, 200),  # another host: success
    (302, "/again", 10, 500),  # more than 10 redirects
    (302, None, 0, 200),  # no Location: any 3xx is 200
    (304, None, 0, 200),
    (300, "/x", 0, 200),  # not a redirect Go follows
])
def test_kubelets_redirect_rules(status: int, location: str | None, redirects: int, verdict: object) -> None:
    assert after_answer(status, location, FIRST, FIRST, redirects) == verdict


def test_metrics_targets_from_the_environment() -> None:
    annotations = json.dumps({"scrape": "true", "path": "/stats", "port": "9000"})
    env = {"ISTIO_PROMETHEUS_ANNOTATIONS": annotations}
    assert metrics_config(env, 15020, envoy=True, sidecar=True) == \
        MetricsConfig(Target(15090, "/stats/prometheus"), (Target(9000, "/stats"),))
    assert metrics_config(env, 15020, envoy=True, sidecar=False) == MetricsConfig(Target(15090, "/stats/prometheus"))
    assert metrics_config({**env, "PILOT_AGENT_MERGE_ENVOY_STATS": "false"}, 15020, envoy=True, sidecar=True).envoy \
        is None
    assert metrics_config(env, 15020, envoy=False, sidecar=True).envoy is None
    assert metrics_config({"ISTIO_PROMETHEUS_ANNOTATIONS": "{}"}, 15020, envoy=False, sidecar=True).apps == \
        (Target(80, "/metrics"),)  # pilot-agent's defaults
    assert metrics_config({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"scrape": "false", "port": "1"}'}, 15020, envoy=False,
                          sidecar=True).apps == ()
    targets = '{"targets": [{"port": "9000"}, {"port": "9001", "path": "/m"}]}'
    assert metrics_config({"ISTIO_PROMETHEUS_ANNOTATIONS": targets}, 15020, envoy=False, sidecar=True).apps == \
        (Target(9000, "/metrics"), Target(9001, "/m"))


@pytest.mark.parametrize("env,message", [
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": "{"}, "ISTIO_PROMETHEUS_ANNOTATIONS: not JSON"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": "15021"}'}, "target port 15021 is reserved for Istio (Envoy health)"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": "15030"}'}, "target port 15030 is the status port"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": "http"}'}, "invalid target port 'http'"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": 9000}'}, "invalid target port 9000"),
    ({"ISTIO_PROMETHEUS_ANNOTATIONS": '{"port": "9000", "path": "a b"}'}, "invalid target path"),
    ({"PILOT_AGENT_MERGE_ENVOY_STATS": "maybe"}, "PILOT_AGENT_MERGE_ENVOY_STATS"),
])
def test_bad_metrics_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        metrics_config(env, 15030, envoy=True, sidecar=True)
    assert message in str(err.value)


@pytest.mark.parametrize("accept,allowed,expected", [
    ("", ("text/plain",), "text/plain;version=0.0.4"),
    ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
     ("text/plain",), "text/plain;version=0.0.4"),
    ("*/*", ("text/*", "text/plain"), "text/plain; q=0.1; version=0.0.4"),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
     ("text/*", "text/plain"), "text/plain; q=0.1; version=0.0.4"),
    ("application/*,*/*", ("text/plain", "application/openmetrics-text"),
     "application/openmetrics-text; q=0.2; version=0.0.1,text/plain; q=0.1; version=0.0.4"),
    ("text/plain;;bad=", ("text/plain",), "text/plain;version=0.0.4"),
])
def test_accept_for_a_target(accept: str, allowed: tuple[str, ...], expected: str) -> None:
    assert accept_for_target(accept, allowed) == expected


def test_the_answer_takes_the_apps_format() -> None:
    assert answer_format("application/openmetrics-text; version=1.0.0; charset=utf-8") == OPENMETRICS_1_0_0
    assert answer_format("application/openmetrics-text") == OPENMETRICS_0_0_1
    assert answer_format("application/openmetrics-text; version=2.0.0") == TEXT
    assert answer_format("text/plain; version=0.0.4") == TEXT
    assert answer_format(";;") == TEXT
    assert merged_format([]) == TEXT
    assert merged_format(["application/openmetrics-text", "application/openmetrics-text; version=0.0.1"]) == \
        OPENMETRICS_0_0_1
    assert merged_format(["application/openmetrics-text", "text/plain"]) == TEXT  # they disagree


def test_merge_keeps_one_eof_and_separates_parts() -> None:
    assert strip_eof(b"a 1\n# EOF\n \n") == b"a 1\n"
    assert strip_eof(b"a 1\n") == b"a 1\n"
    assert merge(TEXT, b"agent 1\n", b"envoy 2", [b"app 3\n# EOF\n"]) == b"agent 1\nenvoy 2\napp 3\n"
    assert merge(OPENMETRICS_1_0_0, b"agent 1\n", None, [b"a 3\n# EOF\n", b"b 4"]) == b"agent 1\na 3\nb 4\n# EOF\n"


def test_a_request_keeps_only_headers_it_may_pass_on() -> None:
    head = (b"GET /app-health/web/livez?x=1 HTTP/1.1\r\nHost: pod:15020\r\nX-Ok: a\tb\r\nX-Bad: a\nInjected: 1\r\n"
            b"X-Nul: a\x00\r\nBad Name: c\r\nno colon\r\n\r\n")
    request = parse_request(head)
    assert request is not None and request.route == "/app-health/web/livez" and request.query == "x=1"
    assert request.headers == (("Host", "pod:15020"), ("X-Ok", "a\tb"))
    assert parse_request(b"GET /stats/prometheus?a=\x01 HTTP/1.1\r\n\r\n") is None
    assert parse_request(b"\r\n\r\n") is None
    assert parse_request(b"GET /%61pp-health/web/livez HTTP/1.1\r\n\r\n").route == "/app-health/web/livez"  # type: ignore[union-attr]
