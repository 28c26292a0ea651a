"""Auto-registration end to end (tests/e2e/meshlab.py): the reviews pod stands for a VM, its agent
with ISTIO_META_AUTO_REGISTER_GROUP and a mesh config whose readinessProbe checks a health
server beside its app, as `istioctl x workload entry configure` sets a VM up. The control plane
makes it a WorkloadEntry of its WorkloadGroup; productpage reaches it by the name of a Service
selecting the group's labels, over mTLS through both Envoys, once its agent reports it healthy;
the health server stopped takes it out of productpage's EDS and name table; its agent stopped
removes the entry after the grace period (docs/controlplane.md "Auto-registration")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from meshlab import MESH, NAMESPACE, Mesh, as_app, health_server, in_eds, probe, running_mesh, wait, with_vm_group
from netns import PEER_V4
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)

HEALTH_PORT = 9082
VM_MESH = with_vm_group(MESH, "reviews-vm", "reviews", "10.96.0.30", HEALTH_PORT)
CLUSTER = f"outbound|9080||reviews-vm.{NAMESPACE}.svc.cluster.local"
ENTRY = f"{NAMESPACE}/reviews-vm-{PEER_V4}"



def _in_productpages_eds(lab: Mesh) -> bool:
    return in_eds(lab.topo.pod, CLUSTER, PEER_V4)


def _resolves(lab: Mesh) -> bool:
    done = as_app(lab.productpage, "getent", "hosts", "reviews-vm-headless")
    return done.returncode == 0 and done.stdout.split()[0] == PEER_V4


@pytest.mark.timeout(300)
def test_a_vm_joins_by_itself_leaves_when_unhealthy_and_is_removed_after_the_grace_period() -> None:
    env = {"ISTIO_META_AUTO_REGISTER_GROUP": "reviews-vm"}
    mesh_config = f"defaultConfig:\n  readinessProbe: {probe(HEALTH_PORT)}\n"
    with running_mesh(VM_MESH, ("--workload-entry-grace", "2s"), env, mesh_config) as lab:
        def until(condition: Callable[[], bool], what: str) -> None:
            wait(condition, what, (lab.productpage, lab.reviews), timeout=60)

        def cp_log() -> str:
            return lab.reviews.log("cp/log")

        until(lambda: f"registered WorkloadEntry {ENTRY}" in cp_log(), "the VM registered")
        assert not _in_productpages_eds(lab)  # its probe has nothing to reach yet: not ready
        health = health_server(lab.reviews, lab.topo.peer, HEALTH_PORT)
        until(lambda: _in_productpages_eds(lab), "the VM in productpage's EDS once healthy")
        until(lambda: _resolves(lab), "the headless name resolving to the VM")
        done = as_app(lab.productpage, "curl", "-sS", "-m", "10", "http://reviews-vm:9080/")
        assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in done.stdout, (done.stdout, done.stderr)

        health.kill()
        health.wait(timeout=10)
        until(lambda: not _in_productpages_eds(lab), "the unhealthy VM out of productpage's EDS")
        until(lambda: not _resolves(lab), "the unhealthy VM out of the headless name")
        assert f"WorkloadEntry {ENTRY} is unhealthy" in cp_log()

        health_server(lab.reviews, lab.topo.peer, HEALTH_PORT)
        until(lambda: _in_productpages_eds(lab), "the VM back once healthy again")
        vm_agent = lab.agents["reviews"]
        vm_agent.terminate()
        vm_agent.wait(timeout=60)
        until(lambda: f"removed WorkloadEntry {ENTRY} (disconnected for 2s)" in cp_log(),
              "the entry removed after the grace period")
        until(lambda: not _in_productpages_eds(lab), "the removed VM out of productpage's EDS")
