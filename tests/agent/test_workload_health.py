"""The workload's health for the control plane (agent/workloadhealth.py): ProxyConfig's
readinessProbe read as Istio fills it in, Envoy asked first, the application probed, and
each change of state handed to the xDS proxy."""

from __future__ import annotations

import socket

import pytest
import trio

from pilotfish.agent.meshconfig import ConfigSources, effective_proxy_config
from pilotfish.agent.workloadhealth import HealthConfig, WorkloadHealth, health_config
from pilotfish.common.settings import ConfigError
from pilotfish.xds_client.health import Health


def config_of(yaml: str) -> HealthConfig | None:
    return health_config(effective_proxy_config(ConfigSources(env=yaml)))


def test_no_probe_no_reports() -> None:
    assert config_of("discoveryAddress: a:1") is None


def test_defaults_as_istio_fills_them_in() -> None:
    config = config_of("readinessProbe:\n  tcpSocket: {port: 8080}\n")
    assert config is not None
    assert (config.initial_delay, config.period, config.timeout, config.success_threshold,
            config.failure_threshold) == (0.0, 10.0, 1.0, 1, 1)
    exec_config = config_of("readinessProbe:\n  exec: {command: [/bin/true]}\n  periodSeconds: 3\n")
    assert exec_config is not None and exec_config.command == ("/bin/true",) and exec_config.period == 3.0


@pytest.mark.parametrize(("yaml", "words"), [
    ("readinessProbe: [1]", ("readinessProbe", "want an object")),
    ("readinessProbe:\n  tcpSocket: {port: http}\n", ("readinessProbe", "port", "'http'")),
    ("readinessProbe:\n  exec: {command: []}\n", ("readinessProbe", "exec.command")),
    ("readinessProbe:\n  tcpSocket: {port: 1}\n  periodSeconds: -1\n", ("periodSeconds", "-1")),
    ("readinessProbe: &a {x: [*a, *a]}\n", ("readinessProbe",)),  # YAML can't alias itself: a parse error
    ("readinessProbe:\n  x: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]\n"
     "  y: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "  z: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n", ("more than 256 values",)),
])
def test_bad_probes_are_named(yaml: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        config_of(yaml)
    for word in words:
        assert word in str(err.value)


class Reports:
    """The xDS proxy's side: the reports it was handed."""

    def __init__(self) -> None:
        self.got: list[Health] = []

    def report_health(self, health: Health) -> None:
        self.got.append(health)


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.01)


def test_envoy_first_then_the_application_each_change_reported() -> None:
    app = socket.create_server(("127.0.0.1", 0))
    port = app.getsockname()[1]
    config = config_of(f"readinessProbe:\n  tcpSocket: {{port: {port}}}\n  periodSeconds: 1\n")
    assert config is not None
    config = HealthConfig(config.probe, (), 0.0, 0.02, 1.0, 1, 2)  # quick rounds; unhealthy after 2 failures
    envoy: list[str | None] = ["server is not live, current state is: PRE_INITIALIZING"]
    reports = Reports()
    part = WorkloadHealth(config, reports, lambda: envoy[0], "127.0.0.1")  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(part.serve)
            await wait_for(lambda: len(reports.got) == 1)
            assert reports.got[0] == Health(False, "Envoy not ready: server is not live, current state is: "
                                                   "PRE_INITIALIZING")
            envoy[0] = None
            await wait_for(lambda: len(reports.got) == 2)
            assert reports.got[1] == Health(True)
            app.close()  # refused from now on
            await wait_for(lambda: len(reports.got) == 3)
            assert reports.got[2] == Health(False, "application probe failed with status 500")
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        app.close()


@pytest.mark.parametrize(("command", "reason"), [
    ("/bin/true", None), ("/bin/false", "exec /bin/false: exit code 1"),
    ("/nonexistent/check", "exec /nonexistent/check: No such file or directory"),
])
def test_exec_probe(command: str, reason: str | None) -> None:
    config = config_of(f"readinessProbe:\n  exec: {{command: [{command}]}}\n")
    assert config is not None
    part = WorkloadHealth(config, Reports(), lambda: None, "127.0.0.1")  # type: ignore[arg-type]
    assert trio.run(part.check) == reason
