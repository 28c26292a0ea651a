"""`pilotfish vm install` on a real `/` under a real systemd (docs/vm.md "Under systemd"): a VM as
a container booting systemd as PID 1 (deploy/vm/Dockerfile, built by deploy/image/build.py --vm),
on the docker network of the control plane of tests/deploy/containers.py, with productpage's
identity and address in meshlab's mesh.

Istio's VM files as istioctl writes them (tests/vm_files.py) are installed with no --root: the
account is made with groupadd/useradd, the unit started by `systemctl enable --now` (Type=notify:
it returns once the agent said READY=1) with its hardening as written. The tests run in file
order on one VM: the unit runs as istio-proxy, `vm status` says all is well, a mesh name resolves
through the DNS proxy, systemd restarts a killed agent, and `vm uninstall` leaves no unit, no
rules, no user and no file behind."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from containers import Cluster, builder, docker, mesh_pods, resolv_mount, start_mesh, wait_for  # noqa: E402
from meshlab import REVIEWS_VIP  # noqa: E402
from vm_files import write_vm_files  # noqa: E402

PILOTFISH = "/usr/local/lib/pilotfish/bin/pilotfish"  # the VM's virtualenv (deploy/vm/Dockerfile)
UNIT = "pilotfish"
MESH_NAME = "reviews.default.svc.cluster.local"
# the unit's WatchdogSec=30 shortened by a drop-in the VM has before install (and keeps after
# uninstall), so that pings are seen to keep the agent alive past it within seconds
WATCHDOG_S = 3
DROP_IN = f"/etc/systemd/system/{UNIT}.service.d/watchdog.conf"
# what install changes (docs/vm.md "What install changes"; /var/run is /run): listed before
# install and after uninstall, modes, owners, link targets and contents
TOUCHED = ("/etc/istio", "/etc/certs", "/var/lib/istio", "/var/lib/pilotfish", "/run/secrets", "/usr/local/bin",
           "/etc/systemd/system", "/etc/hosts")
LISTING = (f"find {' '.join(TOUCHED)} -printf '%p %M %u:%g %l\\n' 2>/dev/null | sort; "
           f"find {' '.join(TOUCHED)} -type f -exec sha256sum {{}} + 2>/dev/null | sort; true")


def missing_capabilities() -> list[str]:
    """The capabilities this machine's bounding set lacks (by capsh's names): `--privileged` asks
    docker for every one it knows and fails here ("unable to apply caps") when the engine itself
    runs without one, as it does where the machine is itself a container."""
    status = Path("/proc/self/status").read_text()
    bounding = int(re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    missing = sum(1 << bit for bit in range(last + 1) if not bounding >> bit & 1)
    if not missing:
        return []
    done = subprocess.run(["capsh", f"--decode={missing:#x}"], capture_output=True, text=True, timeout=10, check=False)
    return [name.upper() for name in done.stdout.strip().partition("=")[2].split(",") if name]


def systemd_args() -> list[str]:
    """What systemd needs as a container's PID 1 (systemd.io/CONTAINER_INTERFACE): the cgroup tree
    writable (here with the host's cgroup namespace, as on cgroup v1 it must be), /run and
    /run/lock tmpfs; and what the unit's sandbox needs (namespaces, seccomp filters, the capture's
    iptables): every capability the engine can give, no seccomp or AppArmor profile of docker's."""
    return ["--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "--cap-add", "ALL", *[arg for cap in missing_capabilities() for arg in ("--cap-drop", cap)],
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"]


@dataclass
class Vm:
    cluster: Cluster
    before: str  # LISTING before install

    @property
    def name(self) -> str:
        return f"{self.cluster.tag}-vm"

    def run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout,
                              check=False)

    def show(self, *props: str) -> dict[str, str]:
        """`systemctl show` of the unit: the properties asked for."""
        out = self.run("systemctl", "show", *[f"--property={p}" for p in props], UNIT).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines())

    def journal(self) -> str:
        out = self.run("journalctl", "--no-pager", "-n", "80", "-u", UNIT)
        return f"--- journal of {UNIT}:\n{out.stdout}{out.stderr}"


def boot_state(vm: Vm) -> str:
    return vm.run("systemctl", "is-system-running", timeout=30).stdout.strip()


@pytest.fixture(scope="module")
def vm_image(image: str) -> str:
    return str(builder.build_vm(app=image))


@pytest.fixture(scope="module")
def vm(image: str, vm_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    work = tmp_path_factory.mktemp("vm-systemd")
    work.chmod(0o755)
    cluster = Cluster(image, work)  # the control plane's image; the VM's is given to its `docker run`
    productpage, reviews = mesh_pods()
    try:
        cp_ip = start_mesh(cluster, productpage, reviews)
        files = write_vm_files(work / "vmfiles", (work / "secrets" / "root-cert.pem").read_bytes(), productpage.token,
                               cp_ip, service_account=productpage.service_account, workload="productpage")
        files.chmod(0o755)
        cluster.run("vm", "--network", cluster.network, "--ip", productpage.ip, "--hostname", "productpage-vm",
                    *systemd_args(), *resolv_mount(cluster), "-v", f"{files}:/vmfiles:ro", vm_image)
        machine = Vm(cluster, "")
        try:
            wait_for(lambda: boot_state(machine) in ("running", "degraded") or not running(machine.name),
                     "systemd booted", lambda: cluster.logs("vm"))
        except AssertionError as err:
            pytest.skip(f"systemd does not come up as PID 1 in a container here: {err}")
        if not running(machine.name):
            pytest.skip(f"systemd does not run as PID 1 in a container here: it exited\n{cluster.logs('vm')}")
        drop_in = f"mkdir -p {Path(DROP_IN).parent} && printf '[Service]\\nWatchdogSec={WATCHDOG_S}\\n' > {DROP_IN}"
        assert machine.run("sh", "-c", drop_in).returncode == 0
        machine.before = machine.run("sh", "-c", LISTING).stdout
        yield machine
    finally:
        cluster.close()


def running(container: str) -> bool:
    return docker("inspect", "--format", "{{.State.Running}}", container, check=False) == "true"


@pytest.mark.timeout(900)  # a fresh machine debootstraps both bases and builds both images first
def test_install_starts_the_unit_as_istio_proxy_once_the_agent_is_ready(vm: Vm) -> None:
    done = vm.run(PILOTFISH, "vm", "install", "--files", "/vmfiles")
    assert done.returncode == 0, done.stdout + done.stderr + vm.journal()
    assert "running systemctl enable --now pilotfish.service" in done.stdout, done.stdout
    # Type=notify: `systemctl start` returned once READY=1 came, with the agent's STATUS= beside it
    unit = vm.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (unit["ActiveState"], unit["SubState"], unit["StatusText"]) == ("active", "running", "ready"), (
        unit, vm.journal())
    assert vm.run("getent", "passwd", "istio-proxy").stdout.strip() == (
        "istio-proxy:x:1337:1337::/var/lib/istio:/usr/sbin/nologin")
    assert vm.run("getent", "group", "istio-proxy").stdout.strip() == "istio-proxy:x:1337:"
    ids = vm.run("grep", "-E", "^(Uid|Gid):", f"/proc/{unit['MainPID']}/status").stdout.split()
    assert ids == ["Uid:", *["1337"] * 4, "Gid:", *["1337"] * 4], ids


@pytest.mark.timeout(120)
def test_status_says_all_is_well(vm: Vm) -> None:
    done = vm.run(PILOTFISH, "vm", "status")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 6, done.stdout + done.stderr + vm.journal()
    assert [line.split()[:2] for line in lines] == [
        ["OK", "capture"], ["OK", "agent"], ["OK", "certificate"], ["OK", "name"], ["OK", "control"], ["OK", "unit"]]
    assert "spiffe://cluster.local/ns/default/sa/productpage" in done.stdout
    assert "pilotfish.service is active" in done.stdout


@pytest.mark.timeout(120)
def test_the_vm_resolves_a_mesh_name_through_the_dns_proxy(vm: Vm) -> None:
    """glibc's resolver as an ordinary user (nobody, not the proxy's 1337), the short name through
    resolv.conf's search list: the query to its nameserver is captured to the agent's DNS proxy,
    which answers from the control plane's name table; no /etc/hosts entry has the name. (IPv4
    only: the AAAA query would go on down the search list to that nameserver, where nothing
    answers in this mesh, and wait out glibc's 5 s timeout.)"""
    assert "reviews" not in vm.run("cat", "/etc/hosts").stdout
    done = vm.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "getent", "ahostsv4", "reviews")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split()[:3] == [REVIEWS_VIP, "STREAM", MESH_NAME], done.stdout


@pytest.mark.timeout(120)
def test_the_agents_watchdog_pings_keep_it_running(vm: Vm) -> None:
    """WatchdogSec: systemd kills an agent whose WATCHDOG=1 pings stop (its event loop hangs).
    A ping later than two periods after the start, from the same process, shows pings arrive
    in time."""
    unit = vm.show("WatchdogUSec", "MainPID", "ExecMainStartTimestampMonotonic", "NRestarts")
    assert unit["WatchdogUSec"] == f"{WATCHDOG_S}s", unit
    started = int(unit["ExecMainStartTimestampMonotonic"])

    def pinged_past_two_periods() -> bool:
        return int(vm.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]) > started + 2 * WATCHDOG_S * 10**6

    wait_for(pinged_past_two_periods, "a watchdog ping two periods after the start", vm.journal, timeout=30)
    assert vm.show("MainPID", "NRestarts", "ActiveState") == {
        "MainPID": unit["MainPID"], "NRestarts": unit["NRestarts"], "ActiveState": "active"}, vm.journal()


@pytest.mark.timeout(120)
def test_systemd_restarts_a_killed_agent(vm: Vm) -> None:
    """Restart=always: the agent and Envoy killed, the unit's ExecStopPost clears the rules,
    and after RestartSec the whole start runs again (capture, then the agent to READY=1)."""
    before = vm.show("MainPID", "NRestarts")
    done = vm.run("systemctl", "kill", "--signal=SIGKILL", UNIT)
    assert done.returncode == 0, done.stderr

    def restarted() -> bool:
        now = vm.show("ActiveState", "MainPID", "NRestarts")
        return (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1)

    wait_for(restarted, "the agent restarted by systemd", vm.journal, timeout=60)
    assert vm.run(PILOTFISH, "vm", "status").returncode == 0, vm.journal()


@pytest.mark.timeout(180)
def test_a_restart_without_the_token_connects_with_the_issued_certificate(vm: Vm) -> None:
    """/var/run is a tmpfs: after a reboot (or the token's hour) there is no token. The agent
    renews with mTLS and presents PROV_CERT's certificate on its control-plane connection
    (docs/vm.md), so the unit gets ready again: `systemctl restart` returns once READY=1."""
    assert vm.run("rm", "/var/run/secrets/tokens/istio-token").returncode == 0
    done = vm.run("systemctl", "restart", UNIT, timeout=150)
    assert done.returncode == 0, done.stderr + vm.journal()
    assert vm.show("ActiveState", "StatusText") == {"ActiveState": "active", "StatusText": "ready"}, vm.journal()
    status = vm.run(PILOTFISH, "vm", "status")
    assert status.returncode == 0, status.stdout + vm.journal()


@pytest.mark.timeout(180)
def test_uninstall_leaves_no_unit_rules_user_or_file(vm: Vm) -> None:
    done = vm.run(PILOTFISH, "vm", "uninstall")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ran systemctl disable --now pilotfish.service" in done.stdout, done.stdout
    assert vm.show("LoadState", "ActiveState") == {"LoadState": "not-found", "ActiveState": "inactive"}
    for save in ("iptables-legacy-save", "iptables-nft-save"):
        rules = vm.run(save).stdout
        assert "ISTIO_" not in rules, (save, rules)
    assert vm.run("getent", "passwd", "istio-proxy").returncode == 2
    assert vm.run("getent", "group", "istio-proxy").returncode == 2
    assert vm.run("sh", "-c", LISTING).stdout == vm.before
