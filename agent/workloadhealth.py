"""The workload's health reported to the control plane over the xDS proxy's stream, as Istio's
agent does for VMs (WorkloadEntry health: docs/istio-compat.md "Workload health over xDS"):
only when ProxyConfig has a `readinessProbe`. Each round asks Envoy first (not ready: unhealthy,
with Envoy's reason), then the application's probe (HTTP, TCP or gRPC from 127.0.0.6, as the
status port's application probes, or a command). xds_client/health.py counts the results and
says when the state changes; the xDS proxy sends it.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from pilotfish.common.settings import ConfigError
from pilotfish.xds_client.health import HealthTracker, watch_health
from pilotfish.xds_client.proxy import XdsProxy

from .appprobe import AppProbe, AppProbeConfig, probe_addresses, probe_spec
from .prober import AppProber

log = logging.getLogger("pilotfish.agent")

FIELD = "ProxyConfig readinessProbe"
PATH = "/workload-health"  # the prober's key for the one probe (never served on the status port)


@dataclass(frozen=True)
class HealthConfig:
    """`readinessProbe` with Istio's defaults (fillInDefaults): period 10 s, timeout 1 s,
    thresholds 1, no initial delay."""

    probe: AppProbe | None  # None: `command` is the check
    command: tuple[str, ...]
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int


def _seconds(spec: Mapping[str, object], name: str, default: int) -> int:
    value = spec.get(name) or default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{FIELD}: {name}: want a whole number, got {value!r}")
    return value


def health_config(pc: Mapping[str, object]) -> HealthConfig | None:
    """The readiness probe of the effective ProxyConfig; None without one. ConfigError names the field."""
    spec = pc.get("readinessProbe")
    if spec is None:
        return None
    assert isinstance(spec, dict)  # agent/meshconfig.py keeps objects only
    timeout = _seconds(spec, "timeoutSeconds", 1)
    exec_spec = spec.get("exec")
    if exec_spec is not None:
        command = exec_spec.get("command") if isinstance(exec_spec, dict) else None
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise ConfigError(f"{FIELD}: exec.command: want a non-empty list of strings, got {command!r}")
        probe, argv = None, tuple(command)
    else:
        probe, argv = probe_spec({k: v for k, v in spec.items() if k in ("httpGet", "tcpSocket", "grpc")}
                                 | {"timeoutSeconds": timeout}, FIELD), ()
    return HealthConfig(probe, argv, float(_seconds(spec, "initialDelaySeconds", 0)),
                        float(_seconds(spec, "periodSeconds", 10)), float(timeout),
                        max(1, _seconds(spec, "successThreshold", 1)), max(1, _seconds(spec, "failureThreshold", 1)))


class WorkloadHealth:
    """A component of the agent (agent/components.py), started after the xDS proxy."""

    name = "workload-health"

    def __init__(self, config: HealthConfig, proxy: XdsProxy, envoy_ready: Callable[[], str | None],
                 instance_ip: str) -> None:
        self.config = config
        self.proxy = proxy
        self.envoy_ready = envoy_ready
        destination, source = probe_addresses(instance_ip, False)
        self.prober = AppProber(AppProbeConfig({PATH: config.probe}, destination, source)) if config.probe else None

    async def check(self) -> str | None:
        """None when Envoy and the application are healthy, else why not."""
        envoy = self.envoy_ready()
        if envoy is not None:
            return f"Envoy not ready: {envoy}"
        if self.prober is not None:
            answer = await self.prober.probe(PATH, [], 0)
            return None if 200 <= answer.status < 400 else f"application probe failed with status {answer.status}"
        with trio.move_on_after(self.config.timeout):
            try:
                done = await trio.run_process(self.config.command, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, check=False, stdin=b"")
            except OSError as err:
                return f"exec {self.config.command[0]}: {err.strerror or err}"
            if done.returncode == 0:
                return None
            return f"exec {self.config.command[0]}: exit code {done.returncode}"
        return f"exec {self.config.command[0]}: no answer within {self.config.timeout:g}s"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        log.info("agent: reporting workload health every %gs after %gs", self.config.period, self.config.initial_delay)
        await watch_health(self.check, HealthTracker(self.config.success_threshold, self.config.failure_threshold),
                           self.proxy.report_health, self.config.period, self.config.initial_delay)

    def ready(self) -> str | None:
        return None  # the workload's health goes to the control plane, not to kubelet
