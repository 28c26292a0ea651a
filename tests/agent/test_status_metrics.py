"""The status server's merged metrics against real HTTP servers standing in for Envoy's 15090 and
the application (prometheus_client's parsers read the answer); a target over its cap or not
answering is left out and counted; /drain and the other privileged endpoints answer loopback
peers only."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from pilotfish.agent.metricsmerge import APP_MAX_BODY, OPENMETRICS_1_0_0, TEXT, MetricsConfig, MetricsMerge, Target
from pilotfish.agent.status import StatusServer, StatusSources

from .status_targets import App, framed, get, loopback, reply, run_status

ENVOY_TEXT = (b"# TYPE envoy_cluster_upstream_cx_total counter\n"
              b'envoy_cluster_upstream_cx_total{envoy_cluster_name="xds-grpc"} 3\n')
APP_TEXT = b"# TYPE app_requests_total counter\napp_requests_total 7\n"
APP_OPENMETRICS = b"# TYPE app_jobs counter\napp_jobs_total 2.0\n# EOF\n"
OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def sources(envoy: App | None, apps: list[tuple[App, str]], **kw: object) -> StatusSources:
    config = MetricsConfig(Target(envoy.port, "/stats/prometheus") if envoy else None,
                           tuple(Target(app.port, path) for app, path in apps))
    return StatusSources(lambda: None, CollectorRegistry(), lambda: None, lambda: None,
                         metrics=MetricsMerge(config, host="127.0.0.1"), **kw)  # type: ignore[arg-type]


def scrape(source: StatusSources, path: str = "/stats/prometheus",
           headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    answers = []
    run_status(StatusServer(loopback(), source),
               lambda port: answers.append(get(port, path, headers=headers)))
    status, body, response_headers = answers[0]
    return status, body.decode(), response_headers


def names(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


def test_agent_envoy_and_app_series_merge_into_text_prometheus_parses() -> None:
    with App({"/stats/prometheus": reply(200, ENVOY_TEXT)}) as envoy, \
            App({"/metrics": reply(200, APP_TEXT)}) as app:
        source = sources(envoy, [(app, "/metrics")])
        status, text, headers = scrape(source, "/stats/prometheus?usedonly", {"User-Agent": "Prometheus/3"})
        assert status == 200 and headers["content-type"] == TEXT
        found = names(text)
        assert {"pilotfish_status_connections", "istio_agent_scrapes", "envoy_cluster_upstream_cx",
                "app_requests"} <= found
        assert envoy.paths == ["/stats/prometheus?usedonly"]  # the scraper's query goes to Envoy
        assert envoy.headers[0]["User-Agent"] == "Prometheus/3"
        assert envoy.headers[0]["Accept"] == "text/plain;version=0.0.4"
        assert 'istio_agent_scrape_failures_total{type="application"} 0.0' in text


def test_openmetrics_from_the_app_makes_an_openmetrics_answer_with_one_eof() -> None:
    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    with App({"/m": reply(200, APP_OPENMETRICS, content_type)}) as app:
        status, text, headers = scrape(sources(None, [(app, "/m")]), "/metrics", {"Accept": OPENMETRICS_ACCEPT})
        assert status == 200 and headers["content-type"] == OPENMETRICS_1_0_0
        # the scraper's order, q falling; */* is text 0.0.4, already asked for
        assert app.headers[0]["Accept"] == "application/openmetrics-text; q=0.2; version=1.0.0,text/plain; q=0.1; " \
            "version=0.0.4"
        assert text.count("# EOF") == 1 and text.endswith("# EOF\n")
        found = {family.name for family in openmetrics_families(text)}
        assert {"pilotfish_status_connections", "app_jobs"} <= found


def test_a_target_over_its_cap_or_hanging_is_left_out_and_counted() -> None:
    release = threading.Event()
    huge = b"# TYPE big gauge\n" + b"big 1\n" * (APP_MAX_BODY // 6 + 1)
    with App({"/stats/prometheus": reply(200, ENVOY_TEXT)}) as envoy, \
            App({"/huge": reply(200, huge), "/hang": reply(200, APP_TEXT, hold=release),
                 "/error": reply(503, APP_TEXT), "/ok": reply(200, APP_TEXT)}) as app:
        source = sources(envoy, [(app, "/huge"), (app, "/hang"), (app, "/error"), (app, "/ok")])
        try:
            status, text, _ = scrape(source, headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.5"})
        finally:
            release.set()
        assert status == 200
        found = names(text)
        assert {"envoy_cluster_upstream_cx", "app_requests"} <= found and "big" not in found
        assert source.metrics.failures == {"envoy": 0, "application": 3, "agent": 0}


def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    lines = [b"# TYPE chunky gauge\n", b"chunky 1\n" * 5000, b"chunky_more 2\n"]
    with App({"/chunked": framed(lines, chunked=True), "/to-close": framed([APP_TEXT], chunked=False)}) as app:
        source = sources(None, [(app, "/chunked"), (app, "/to-close")])
        status, text, _ = scrape(source)
        assert status == 200 and {"chunky", "app_requests"} <= names(text)
        assert text.count("chunky 1") == 5000 and source.metrics.failures["application"] == 0


def test_a_failing_envoy_is_left_out_and_counted() -> None:
    with App({}) as envoy, App({"/metrics": reply(200, APP_TEXT)}) as app:
        source = sources(envoy, [(app, "/metrics")])
        status, text, _ = scrape(source)
        assert status == 200 and "app_requests" in names(text)
        assert source.metrics.failures["envoy"] == 1


def test_drain_is_post_from_loopback_only() -> None:
    drained: list[str] = []
    source = sources(None, [], drain=lambda: drained.append("drain"))
    answers = []

    def client(port: int) -> None:
        answers.append(get(port, "/drain", "GET")[0])
        answers.append(get(port, "/drain", "POST", source="127.0.0.2")[0])  # plays a remote peer
        answers.append(get(port, "/debug/ndsz", source="127.0.0.2")[0])
        answers.append(get(port, "/quitquitquit", "POST", source="127.0.0.2")[0])
        assert not drained
        answers.append(get(port, "/drain", "POST")[0])
        answers.append(get(port, "/healthz/ready", source="127.0.0.2")[0])  # the port serves remote peers

    server = StatusServer(loopback(), source, local=lambda peer: peer == "127.0.0.1")
    run_status(server, client)
    assert answers == [405, 403, 403, 403, 200, 200]
    assert drained == ["drain"]


class Broken:
    """A collector with a bug."""

    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector's bug")


def test_a_broken_agent_collector_leaves_the_agent_out_not_the_scrape() -> None:
    with App({"/metrics": reply(200, APP_TEXT)}) as app:
        source = sources(None, [(app, "/metrics")])
        source.registry.register(Broken())  # type: ignore[arg-type]
        status, text, _ = scrape(source)
        assert status == 200 and names(text) == {"app_requests"}
        assert source.metrics.failures["agent"] == 1
