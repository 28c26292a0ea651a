"""`pilotfish vm status`: each check a pure function of the facts gathered (gather.py), so that
what a failure looks like is testable without a VM (docs/vm.md "Troubleshooting").

One line per check: the capture rules (which iptables backend holds Istio's chains, inbound SSH
not captured), the agent's readiness (and what it still waits for), the workload certificate
(SPIFFE id, expiry), the name table and the control-plane connection (the agent's metrics on
its status port), the unit (systemd).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

NAME_TABLE_TYPE = "type.googleapis.com/istio.networking.nds.v1.NameTable"
SSH_PORT = 22
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Certificate:
    spiffe_id: str
    not_after: float  # Unix time


@dataclass(frozen=True)
class Facts:
    """What `status` found. A str where a fact could not be had says why."""

    now: float
    rules: Mapping[str, str] = field(default_factory=dict)  # backend -> `iptables-save -t nat` output
    ready: tuple[int, str] | str = "not asked"  # (status, body) of /healthz/ready
    metrics: str = ""  # the status port's /stats/prometheus ("" when unreachable)
    certificate: Certificate | str = "not read"
    unit: str | None = None  # `systemctl is-active pilotfish`; None without systemd


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format: (name, sorted labels) -> value."""
    out = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        try:
            out[(name, tuple(sorted(_LABEL.findall(labels or ""))))] = float(value)
        except ValueError:
            continue
    return out


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def istio_chains(save: str) -> list[str]:
    return sorted(line[1:].split()[0] for line in save.splitlines() if line.startswith(":ISTIO_"))


def ssh_captured(save: str) -> bool:
    """Whether inbound TCP to 22 reaches the inbound redirect: ISTIO_INBOUND's rules in order,
    the first matching port 22 (or any port) decides."""
    for line in save.splitlines():
        if not line.startswith("-A ISTIO_INBOUND "):
            continue
        port = re.search(r"--dport (\d+)(?::(\d+))?", line)
        if port is not None and not int(port.group(1)) <= SSH_PORT <= int(port.group(2) or port.group(1)):
            continue
        return "-j RETURN" not in line
    return False


def check_capture(rules: Mapping[str, str]) -> Check:
    found = {backend: istio_chains(save) for backend, save in rules.items() if istio_chains(save)}
    if not rules:
        return Check("capture", False, "no iptables-save found (install iptables)")
    if not found:
        return Check("capture", False, f"no ISTIO_* chains in the nat table ({', '.join(rules)} checked): "
                                       "the unit's ExecStartPre `pilot-agent istio-iptables` has not run or failed")
    if len(found) > 1:
        return Check("capture", False, f"Istio's chains in more than one backend ({', '.join(found)}): "
                                       "run `pilot-agent istio-iptables --cleanup-only` and restart the unit")
    backend, chains = next(iter(found.items()))
    if ssh_captured(rules[backend]):
        return Check("capture", False, f"{backend}: inbound SSH ({SSH_PORT}) is captured: "
                                       "add 22 to ISTIO_LOCAL_EXCLUDE_PORTS in cluster.env")
    return Check("capture", True, f"{backend}: {', '.join(chains)}; inbound SSH ({SSH_PORT}) not captured")


def check_ready(ready: tuple[int, str] | str) -> Check:
    if isinstance(ready, str):
        return Check("agent", False, f"not answering on its status port: {ready}")
    status, body = ready
    if status == 200:
        return Check("agent", True, "ready")
    return Check("agent", False, f"not ready ({status}): {' '.join(body.split())[:300] or 'no reason given'}")


def check_certificate(cert: Certificate | str, now: float) -> Check:
    if isinstance(cert, str):
        return Check("certificate", False, cert)
    left = cert.not_after - now
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(cert.not_after, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if left <= 0:
        return Check("certificate", False, f"{cert.spiffe_id}: expired at {when}: the agent cannot renew it "
                                           "(control plane unreachable, or the token and certificate both expired)")
    return Check("certificate", True, f"{cert.spiffe_id}, valid until {when} ({_ago(left)} left)")


def _value(metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           labels: tuple[tuple[str, str], ...] = ()) -> float | None:
    return metrics.get((name, labels))


def check_name_table(text: str, now: float) -> Check:
    if not text:
        return Check("name table", False, "no metrics from the agent's status port")
    metrics = samples(text)
    received = _value(metrics, "pilotfish_xds_accepted_total", (("type_url", NAME_TABLE_TYPE),))
    if not received:
        return Check("name table", False, "none received from the control plane yet: mesh names do not resolve")
    last = _value(metrics, "pilotfish_xds_last_update_timestamp_seconds") or 0.0
    age = f", last update {_ago(now - last)} ago" if last else ""
    return Check("name table", True, f"received {received:.0f} version(s){age}")


def check_control_plane(text: str) -> Check:
    if not text:
        return Check("control plane", False, "no metrics from the agent's status port")
    metrics = samples(text)
    failures = _value(metrics, "istio_agent_istiod_connection_failures_total") or 0.0
    if _value(metrics, "pilotfish_xds_connected") == 1:
        return Check("control plane", True, "connected")
    return Check("control plane", False, f"not connected ({failures:.0f} failed attempts): check the hosts "
                                         "entry and discoveryAddress, and `journalctl -u pilotfish`")


def check_unit(state: str | None) -> Check:
    if state is None:
        return Check("unit", True, "systemd is not running here: not checked")
    return Check("unit", state == "active", f"pilotfish.service is {state}")


def checks(facts: Facts) -> list[Check]:
    return [check_capture(facts.rules), check_ready(facts.ready), check_certificate(facts.certificate, facts.now),
            check_name_table(facts.metrics, facts.now), check_control_plane(facts.metrics), check_unit(facts.unit)]


def render(results: list[Check]) -> str:
    width = max(len(c.name) for c in results)
    return "\n".join(f"{'OK' if c.ok else 'FAIL':<4}  {c.name:<{width}}  {c.detail}" for c in results) + "\n"
