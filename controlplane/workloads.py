"""Istio's WorkloadGroup and WorkloadEntry, as the control plane models them (docs/controlplane.md
"Auto-registration"): a group is written in the mesh file; an entry is made for each VM whose
agent connects with `AUTO_REGISTER_GROUP` (controlplane/autoregister.py). Services whose
`selector` matches an entry's labels list it as an endpoint (Mesh.with_entries). Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .nametable import Health


@dataclass(frozen=True)
class WorkloadGroup:
    """A WorkloadGroup: the template of its entries (labels, service account, network, ports by
    name) and, with `probe`, a health check: its entries are not ready until the agent reports
    the probe healthy."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"
    network: str = ""
    ports: Mapping[str, int] = field(default_factory=dict)  # port name -> the workload's port
    probe: Mapping[str, object] | None = None  # Istio's spec.probe, checked (mesh.py)


@dataclass(frozen=True)
class WorkloadEntry:
    """One auto-registered workload: a VM in a group, at one address."""

    name: str  # `<group>-<ip>[-<network>]`, as istiod names it
    namespace: str
    group: str
    address: str
    labels: Mapping[str, str]
    service_account: str
    network: str = ""
    ports: Mapping[str, int] = field(default_factory=dict)
    health: Health = Health.HEALTHY

    def selected_by(self, namespace: str, selector: Mapping[str, str]) -> bool:
        """Kubernetes' selector rule: same namespace, every selector label present and equal (an
        empty selector selects nothing, as a Service without one has no managed endpoints)."""
        return (bool(selector) and namespace == self.namespace
                and all(self.labels.get(k) == v for k, v in selector.items()))
