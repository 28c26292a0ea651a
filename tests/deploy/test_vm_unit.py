"""deploy/vm/pilotfish.service: systemd accepts it (`systemd-analyze verify`, with the binaries it
names replaced by ones that exist here: there is no systemd to run it under on this machine), and
it says what the VM set-up needs; the agent derives the pod facts istio-start.sh computes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pilotfish.agent.config import with_vm_defaults

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "vm" / "pilotfish.service"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text().replace("/usr/local/bin/pilot-agent", "/bin/true").replace("/usr/bin/install", "/bin/true")
    unit = tmp_path / "pilotfish.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unit_runs_capture_then_the_agent_as_its_user() -> None:
    lines = UNIT.read_text().splitlines()
    assert "Type=notify" in lines and "User=istio-proxy" in lines and "WatchdogSec=30" in lines
    assert "EnvironmentFile=/var/lib/istio/envoy/cluster.env" in lines
    assert "ExecStartPre=+/usr/local/bin/pilot-agent istio-iptables" in lines  # as root, from cluster.env
    assert "ExecStart=/usr/local/bin/pilot-agent proxy sidecar" in lines
    assert "ExecStopPost=+/usr/local/bin/pilot-agent istio-iptables --cleanup-only" in lines


def test_the_agent_derives_what_istio_start_sh_sets_on_a_vm() -> None:
    vm = with_vm_defaults({"ISTIO_NAMESPACE": "vmns", "ISTIO_SVC_IP": "10.0.0.5"}, hostname=lambda: "vm-1.example")
    assert (vm["POD_NAMESPACE"], vm["POD_NAME"], vm["INSTANCE_IP"]) == ("vmns", "vm-1", "10.0.0.5")
    given = with_vm_defaults({"ISTIO_NAMESPACE": "vmns", "POD_NAME": "given"}, hostname=lambda: "vm-1")
    assert given["POD_NAME"] == "given" and "INSTANCE_IP" not in given
    assert with_vm_defaults({"POD_NAMESPACE": "default"}) == {"POD_NAMESPACE": "default"}  # a pod: untouched
