"""A VM joining the mesh, without systemd (docs/vm.md): Istio's VM files as istioctl writes them,
`pilotfish vm install --root` into the VM's own root directory, then the commands of the installed
unit run as systemd would run them (its environment files, `/` = the root, `+` lines as root, the
rest as istio-proxy's uid 1337). The VM is productpage's network namespace of the two-pod mesh
(tests/e2e/meshlab.py) with no pod sidecar there: it has productpage's identity and address.

The VM's files ask for auto-registration in the WorkloadGroup `productpage-vm` (istioctl's
`--autoregister`: ISTIO_META_AUTO_REGISTER_GROUP, the group's probe as readinessProbe), which a
Service of the mesh selects.

The tests run in file order on one VM: it resolves a mesh name through the DNS proxy with no
/etc/hosts entry for it, reaches reviews over mTLS, keeps inbound SSH uncaptured and `vm status`
says all is well; reviews reaches the VM's app through its auto-registered entry, and the VM's
probe failing takes it out of reviews' endpoints; then the agent stops (status says what fails)
and `uninstall` leaves no rules and no files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import netns as N
import pytest
from meshlab import (
    APP,
    MESH,
    NAMESPACE,
    REVIEWS_VIP,
    Mesh,
    as_app,
    health_server,
    in_eds,
    probe,
    ready,
    running_mesh,
    wait,
    with_vm_group,
)
from netns import APP_UID, PEER_V4, POD_V4, PROXY_UID
from pod_harness import ISTIOD, Pod, ns_listen
from pod_harness import pod_environment as _environment  # noqa: F401  (autouse)
from vm_files import tree, write_vm_files

from pilotfish.agent.vm import unitfile
from pilotfish.agent.vm.layout import MANIFEST, PROXY_USER, UNIT
from pilotfish.agent.vm.vmfiles import parse_env_file

GROUP, VM_VIP, HEALTH_PORT = "productpage-vm", "10.96.0.31", 9082
VM_CLUSTER = f"outbound|9080||{GROUP}.{NAMESPACE}.svc.cluster.local"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's PATH for system services



def pilotfish(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(Path(sys.executable).with_name("pilotfish")), *args]
    return subprocess.run(N.ns_argv(ns, argv) if ns else argv, capture_output=True, text=True, timeout=120,
                          check=False)


def under(root: Path, argv: tuple[str, ...]) -> list[str]:
    """A unit command as it runs on the VM whose `/` is `root`: its absolute paths under the root
    (the installed pilot-agent link; system tools such as install(1) stay the host's), the
    istio-proxy account, absent here, by its id."""
    program = str(root) + argv[0] if (root / argv[0].lstrip("/")).exists() else argv[0]
    args = [str(root) + a if a.startswith("/") else a for a in argv[1:]]
    return [program, *(str(PROXY_UID) if a == PROXY_USER else a for a in args)]


def unit_env(root: Path) -> dict[str, str]:
    def read(path: str) -> dict[str, str] | None:
        file = root / path.lstrip("/")
        return parse_env_file(file.read_text(), path) if file.exists() else None

    return {**unitfile.environment((root / UNIT).read_text(), read), "PATH": PATH}


@dataclass
class Vm:
    lab: Mesh
    pod: Pod
    root: Path
    before: dict[str, tuple[int, int, int, str]]
    agent: subprocess.Popen[bytes]
    health: subprocess.Popen[bytes]


def start_unit(pod: Pod, root: Path) -> subprocess.Popen[bytes]:
    """The installed unit's ExecStartPre lines (to the end), then its ExecStart in the background."""
    text = (root / UNIT).read_text()
    env = unit_env(root)
    for command in unitfile.commands(text):
        uid = None if command.privileged else PROXY_UID
        if command.stage == "ExecStartPre":
            done = subprocess.run(N.ns_argv(pod.ns, under(root, command.argv), uid, uid), env=env, cwd=root,
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        elif command.stage == "ExecStart":
            return pod.spawn(pod.ns, under(root, command.argv), pod.work / "agent.log", uid=uid, env=env, cwd=root)
    raise AssertionError("the unit has no ExecStart")


@pytest.fixture(scope="module")
def vm() -> Iterator[Vm]:
    mesh = with_vm_group(MESH, GROUP, "productpage", VM_VIP, HEALTH_PORT)
    with running_mesh(mesh, productpage_sidecar=False) as lab:
        pod = lab.productpage
        root_cert = (lab.reviews.root / "var/run/secrets/istio/root-cert.pem").read_bytes()
        # as istioctl writes them, but for 22 in the exclusions, which install adds
        files = write_vm_files(lab.work / "vmfiles", root_cert, pod.token, PEER_V4, service_account=pod.service_account,
                               group=GROUP, probe=probe(HEALTH_PORT), exclude_ports="15090,15021,15020")
        # the VM's app (the same as reviews') and the health endpoint its probe checks
        pod.spawn(pod.ns, [sys.executable, "-c", APP], pod.work / "app.log", uid=APP_UID)
        health = health_server(pod, pod.ns, HEALTH_PORT)
        root = pod.work / "vmroot"
        (root / "etc").mkdir(parents=True)
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
        root.chmod(0o755)
        before = tree(root)
        done = pilotfish("vm", "install", "--files", str(files), "--root", str(root))
        assert done.returncode == 0, done.stdout + done.stderr
        # the VM's /etc/hosts is what `ip netns exec` mounts over /etc/hosts for its namespace
        (Path("/etc/netns") / pod.ns / "hosts").write_bytes((root / "etc/hosts").read_bytes())
        agent = start_unit(pod, root)
        wait(lambda: ready(lab.topo.peer, POD_V4) or agent.poll() is not None, "the VM's agent ready", (pod,))
        assert agent.poll() is None, pod.log()[-3000:]
        yield Vm(lab, pod, root, before, agent, health)


@pytest.mark.timeout(240)
def test_status_says_all_is_well(vm: Vm) -> None:
    done = pilotfish("vm", "status", "--root", str(vm.root), ns=vm.pod.ns)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6 and all(line.startswith("OK") for line in lines), done.stdout
    assert "spiffe://cluster.local/ns/default/sa/productpage" in done.stdout


@pytest.mark.timeout(120)
def test_the_vm_resolves_a_mesh_name_through_the_dns_proxy(vm: Vm) -> None:
    name = "reviews.default.svc.cluster.local"
    assert "reviews" not in (vm.root / "etc/hosts").read_text()
    done = as_app(vm.pod, "getent", "hosts", name)
    assert done.returncode == 0 and done.stdout.split()[0] == REVIEWS_VIP, (done.stdout, done.stderr)
    done = as_app(vm.pod, "dig", "+short", "+time=5", "+tries=1", f"{name}.")
    assert done.stdout.strip().splitlines()[-1:] == [REVIEWS_VIP], done.stdout + done.stderr


@pytest.mark.timeout(120)
def test_the_vm_reaches_a_pod_over_mtls_with_its_identity(vm: Vm) -> None:
    done = as_app(vm.pod, "curl", "-sS", "-m", "10", "http://reviews.default.svc.cluster.local:9080/")
    assert done.returncode == 0, done.stderr + vm.pod.log()[-2000:]
    assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in done.stdout, done.stdout


@pytest.mark.timeout(120)
def test_inbound_ssh_is_not_captured(vm: Vm) -> None:
    """The rules return port 22 before the inbound redirect, and a plain-text connection from the
    peer (reviews' own uid, not captured there) reaches a listener on 22 in the VM directly (the
    VM's Envoy in STRICT mTLS would close it)."""
    rules = N.run(N.ns_argv(vm.pod.ns, ["iptables-save", "-t", "nat"])).stdout
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in rules, rules
    listener = ns_listen(vm.pod.ns, 22)
    try:
        accepted = threading.Thread(target=lambda: greet(listener), daemon=True)
        accepted.start()
        peer = subprocess.run(N.ns_argv(vm.lab.topo.peer, [sys.executable, "-c", (
            f"import socket; s = socket.create_connection(('{POD_V4}', 22), timeout=10); print(s.recv(100).decode())")],
            PROXY_UID, PROXY_UID), capture_output=True, text=True, timeout=30, check=False)
        assert peer.stdout.strip() == "SSH-2.0-test", peer.stdout + peer.stderr
    finally:
        listener.close()


def greet(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"SSH-2.0-test\r\n")


@pytest.mark.timeout(120)
def test_a_pod_reaches_the_vm_through_its_auto_registered_entry(vm: Vm) -> None:
    """Nobody listed the VM: its connection made it an endpoint of the Service selecting its
    group, in reviews' Envoy, and reviews' call reaches the VM's app over mTLS."""
    wait(lambda: in_eds(vm.lab.topo.peer, VM_CLUSTER, POD_V4), "the VM in reviews' endpoints", (vm.pod, vm.lab.reviews))
    # a service address must be routable for connect() to reach the capture rules, as a node
    # routes its cluster's service range; the peer namespace has no default route of its own
    N.run(N.ns_argv(vm.lab.topo.peer, ["ip", "route", "replace", f"{VM_VIP}/32", "via", POD_V4]))
    done = as_app(vm.lab.reviews, "curl", "-sS", "-m", "10", f"http://{VM_VIP}:9080/")
    assert "URI=spiffe://cluster.local/ns/default/sa/reviews" in done.stdout, (done.stdout, done.stderr)


@pytest.mark.timeout(120)
def test_the_vms_failing_probe_takes_it_out_of_the_endpoints(vm: Vm) -> None:
    vm.health.kill()
    vm.health.wait(timeout=10)
    wait(lambda: not in_eds(vm.lab.topo.peer, VM_CLUSTER, POD_V4), "the unhealthy VM out of reviews' endpoints",
         (vm.pod, vm.lab.reviews))


@pytest.mark.timeout(180)
def test_a_stopped_agent_fails_status_and_uninstall_leaves_nothing(vm: Vm) -> None:
    os.killpg(vm.agent.pid, 9)
    vm.agent.wait(timeout=10)
    done = pilotfish("vm", "status", "--root", str(vm.root), ns=vm.pod.ns)
    assert done.returncode == 1, done.stdout
    agent = next(line for line in done.stdout.splitlines() if " agent " in line)
    assert agent.startswith("FAIL") and "not answering" in agent, done.stdout
    done = pilotfish("vm", "uninstall", "--root", str(vm.root), ns=vm.pod.ns)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = N.run(N.ns_argv(vm.pod.ns, ["iptables-save"])).stdout
    assert "ISTIO_" not in rules, rules
    assert not (vm.root / MANIFEST).exists()
    assert tree(vm.root) == vm.before
    again = pilotfish("vm", "uninstall", "--root", str(vm.root), ns=vm.pod.ns)
    assert again.returncode == 0 and "nothing is installed" in again.stdout, again.stdout
    assert ISTIOD not in (vm.root / "etc/hosts").read_text()
