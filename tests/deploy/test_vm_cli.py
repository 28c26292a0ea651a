"""`pilotfish vm install|uninstall|status` without a VM (docs/vm.md): Istio's VM files checked
before anything changes (a fault names the file and the line or key, and the root stays as it
was), an install and uninstall round trip into a temp root that leaves it as it was, the unit's
commands and environment as read from its text, and status' checks on gathered facts."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from vm_files import ISTIOD, tree, write_vm_files

from pilotfish.agent.vm import unitfile
from pilotfish.agent.vm.health import Certificate, Facts, check_capture, checks, render
from pilotfish.agent.vm import install as install_module
from pilotfish.agent.vm.install import install, uninstall
from pilotfish.agent.vm.layout import MANIFEST, UNIT, Manifest
from pilotfish.agent.vm.vmfiles import parse_env_file, read_dir
from pilotfish.controlplane.ca import cert_pem, new_key, new_root

NOW = datetime.now(UTC)
ROOT_PEM = cert_pem(new_root(new_key(), NOW - timedelta(days=1)).cert)
ISTIOD_IP = "10.0.0.9"


def files(tmp_path: Path, **env: object) -> Path:
    return write_vm_files(tmp_path / "files", ROOT_PEM, "a-token", ISTIOD_IP, **env)


def a_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/certs").mkdir(parents=True)
    (root / "etc/hosts").write_text("127.0.0.1 localhost")  # no final newline: given back as it was
    (root / "etc/certs/root-cert.pem").write_text("an older root\n")  # replaced, then put back
    return root


def jwt(exp: float) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'exp': exp, 'sub': 'x'})}.c2ln"


def test_istioctls_files_are_accepted_and_ssh_is_excluded_when_missing(tmp_path: Path) -> None:
    vm = read_dir(str(files(tmp_path, exclude_ports="15090,15021,15020")))
    assert vm.env["ISTIO_LOCAL_EXCLUDE_PORTS"] == "22,15090,15021,15020"
    assert vm.env["ISTIO_METAJSON_LABELS"] == '{"app": "productpage", "class": "vm"}'  # shell-quoted, read back
    assert vm.hosts == (f"{ISTIOD_IP} {ISTIOD}",)
    assert any("ISTIO_LOCAL_EXCLUDE_PORTS" in note for note in vm.notes)
    unchanged = read_dir(str(files(tmp_path / "b")))
    assert unchanged.contents["cluster.env"] == (tmp_path / "b/files/cluster.env").read_bytes() and not unchanged.notes
    added = read_dir(str(files(tmp_path / "c", exclude_ports=None)))
    assert added.env["ISTIO_LOCAL_EXCLUDE_PORTS"] == "22,15090,15021,15020"


# (file, its content (None: missing; "+..." added to istioctl's), what the error says)
@pytest.mark.parametrize(("name", "content", "said"), [
    ("cluster.env", "ISTIO_NAMESPACE=de fault\n", "cluster.env line 1: ISTIO_NAMESPACE: want one value"),
    ("cluster.env", "ISTIO_NAMESPACE=default\nnot an assignment\n", "cluster.env line 2: want KEY=value"),
    ("cluster.env", "ISTIO_SERVICE='unterminated\n", "cluster.env line 1: ISTIO_SERVICE: No closing quotation"),
    ("cluster.env", "+ISTIO_INBOUND_PORTS=80,99999\n", "cluster.env: ISTIO_INBOUND_PORTS: invalid port"),
    ("cluster.env", "+ISTIO_INBOUND_PORTS=8080,20:30\n", "ISTIO_INBOUND_PORTS='8080,20:30' captures inbound SSH"),
    ("cluster.env", "+ISTIO_META_DNS_CAPTURE=maybe\n", "cluster.env: ISTIO_META_DNS_CAPTURE"),
    ("cluster.env", None, "cluster.env: missing"),
    ("mesh.yaml", None, "mesh.yaml: missing"),
    ("mesh.yaml", "defaultConfig: [1]\n", "mesh.yaml: defaultConfig: want an object"),
    ("mesh.yaml", "defaultConfig:\n  proxyMetadata: [a]\n", "mesh.yaml: defaultConfig: proxyMetadata"),
    ("root-cert.pem", "not a certificate\n", "root-cert.pem: not a PEM certificate"),
    ("istio-token", "", "istio-token: empty"),
    ("istio-token", jwt((NOW - timedelta(hours=1)).timestamp()), "istio-token: the token expired at"),
    ("hosts", "istiod.istio-system.svc\n", "hosts line 1: want an IP address first"),
    ("hosts", "10.0.0.1 istiod.istio-system.svc evil\x1b[2J\n", "hosts line 1: 'evil\\x1b[2J' is not a host name"),
    ("hosts", "10.0.0.1 -istiod\n", "hosts line 1: '-istiod' is not a host name"),
])
def test_a_bad_file_is_named_and_nothing_is_changed(tmp_path: Path, name: str, content: str | None,
                                                    said: str) -> None:
    directory = files(tmp_path)
    if content is None:
        (directory / name).unlink()
    elif content.startswith("+"):
        (directory / name).write_text((directory / name).read_text() + content[1:])
    else:
        (directory / name).write_text(content)
    root = a_root(tmp_path)
    before = tree(root)
    lines: list[str] = []
    assert install(str(directory), str(root), lines.append) == 1
    assert said in lines[0], lines
    assert lines[-1] == "nothing was changed"
    assert tree(root) == before


@pytest.mark.parametrize("name", ["mesh.yaml", "istio-token"])
def test_a_vm_file_that_is_a_link_is_refused_not_followed(tmp_path: Path, name: str) -> None:
    directory = files(tmp_path)
    secret = tmp_path / "root-only"  # another user's link to a file only root may read
    secret.write_text("apiVersion: v1\nkind: Config\n" if name == "mesh.yaml" else "s3cr3t\n")
    secret.chmod(0o600)
    (directory / name).unlink()
    (directory / name).symlink_to(secret)
    root = a_root(tmp_path)
    before = tree(root)
    said: list[str] = []
    assert install(str(directory), str(root), said.append) == 1
    assert said[0] == f"vm install: {name}: is a symbolic link (to {secret}), not the file itself: {directory / name}"
    assert said[-1] == "nothing was changed" and tree(root) == before


def test_a_directory_given_to_istio_proxy_that_is_a_link_is_refused(tmp_path: Path) -> None:
    root = a_root(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # /etc, say: left over by an old install, a link istio-proxy made
    elsewhere.mkdir()
    (root / "var/lib/istio").mkdir(parents=True)
    (root / "var/lib/istio/data").symlink_to(elsewhere)
    before = tree(root)
    said: list[str] = []
    assert install(str(files(tmp_path)), str(root), said.append) == 1
    assert said[0].startswith("vm install: /var/lib/istio/data is a symbolic link"), said
    assert said[-1] == "nothing was changed" and tree(root) == before
    assert elsewhere.stat().st_uid == 0


def test_install_then_uninstall_leaves_the_root_as_it_was(tmp_path: Path) -> None:
    root = a_root(tmp_path)
    before = tree(root)
    said: list[str] = []
    assert install(str(files(tmp_path)), str(root), said.append) == 0, said
    assert (root / "var/lib/istio/envoy/cluster.env").exists() and (root / "etc/istio/config/mesh").exists()
    assert (root / "etc/certs/root-cert.pem").read_bytes() == ROOT_PEM
    token = root / "var/run/secrets/tokens/istio-token"
    assert (token.stat().st_mode & 0o777, token.stat().st_gid) == (0o640, 1337)
    assert all((root / d).stat().st_uid == 1337 for d in ("etc/istio/proxy", "etc/certs", "var/lib/istio/data"))
    hosts = (root / "etc/hosts").read_text()
    assert hosts.startswith("127.0.0.1 localhost\n# BEGIN pilotfish vm") and f"{ISTIOD_IP} {ISTIOD}\n" in hosts
    assert os.readlink(root / "usr/local/bin/pilot-agent") == str(Path(sys.executable).with_name("pilot-agent"))
    assert (root / UNIT).read_text() == unitfile.unit_text()
    assert any(line.startswith("not started: --root is not /") for line in said)
    manifest = Manifest.from_json((root / MANIFEST).read_bytes())
    assert "etc/certs/root-cert.pem" in manifest.replaced and not manifest.user_created
    # what the agent writes while it runs goes too
    (root / "etc/certs/cert-chain.pem").write_text("issued\n")
    (root / "etc/istio/proxy/envoy-rev.json").write_text("{}\n")
    ran: list[list[str]] = []
    assert uninstall(str(root), said.append, run=lambda say, argv: ran.append(argv) or 0) == 0, said
    assert ran == [[str(Path(sys.executable).with_name("pilot-agent")), "istio-iptables", "--cleanup-only"]]
    assert tree(root) == before
    said.clear()
    assert uninstall(str(root), said.append, run=lambda say, argv: ran.append(argv) or 0) == 0
    assert said == [f"nothing is installed under {root} (no /{MANIFEST})"] and len(ran) == 1


def test_an_install_stopped_part_way_is_undone_by_uninstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the middle (here: keeping the root certificate there before) leaves what was
    made recorded, the directories for the backup included: uninstall gives the root back."""
    root = a_root(tmp_path)
    before = tree(root)

    def failing_copy(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(install_module.shutil, "copy2", failing_copy)
    said: list[str] = []
    assert install(str(files(tmp_path)), str(root), said.append) == 1
    assert "No space left on device" in said[-2], said
    monkeypatch.undo()
    assert uninstall(str(root), said.append, run=lambda say, argv: 0) == 0, said
    assert tree(root) == before


def test_a_second_install_is_refused_until_uninstall(tmp_path: Path) -> None:
    root = a_root(tmp_path)
    assert install(str(files(tmp_path)), str(root), lambda line: None) == 0
    said: list[str] = []
    assert install(str(files(tmp_path)), str(root), said.append) == 1
    assert "already installed" in said[0] and said[-1] == "nothing was changed"


def test_the_cli_wants_the_files_and_says_when_nothing_is_installed(tmp_path: Path) -> None:
    pilotfish = str(Path(sys.executable).with_name("pilotfish"))
    done = subprocess.run([pilotfish, "vm", "install"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--files DIR is required" in done.stdout
    done = subprocess.run([pilotfish, "vm", "uninstall", "--root", str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and "nothing is installed" in done.stdout, done.stdout + done.stderr


def test_the_units_commands_and_environment_read_as_systemd_reads_them() -> None:
    text = unitfile.unit_text()
    stages = [(c.stage, c.privileged, c.argv[:2]) for c in unitfile.commands(text)]
    assert stages == [("ExecStartPre", True, ("/usr/bin/install", "-d")),
                      ("ExecStartPre", True, ("/usr/local/bin/pilot-agent", "istio-iptables")),
                      ("ExecStartPre", True, ("/usr/local/bin/pilot-agent", "istio-iptables")),
                      ("ExecStart", False, ("/usr/local/bin/pilot-agent", "proxy")),
                      ("ExecStopPost", True, ("/usr/local/bin/pilot-agent", "istio-iptables"))]
    files = {"/var/lib/istio/envoy/cluster.env": {"PROV_CERT": "/elsewhere", "ISTIO_NAMESPACE": "vmns"}}
    env = unitfile.environment(text, files.get)  # sidecar.env (optional) missing
    assert env == {"PROV_CERT": "/elsewhere", "OUTPUT_CERTS": "./etc/certs", "ISTIO_NAMESPACE": "vmns"}
    with pytest.raises(FileNotFoundError, match="cluster.env"):
        unitfile.environment(text, lambda path: None)


def test_env_file_values_are_read_as_the_shell_reads_istioctls_quoting() -> None:
    env = parse_env_file("# comment\n\nA='it'\"'\"'s'\nB=''\nexport C=plain\nD='{\"a\": 1}'\n")
    assert env == {"A": "it's", "B": "", "C": "plain", "D": '{"a": 1}'}


NAT = """\
*nat
:PREROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
{ssh}-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
COMMIT
"""
SSH_RETURN = "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN\n"
METRICS = """\
# TYPE pilotfish_xds_connected gauge
pilotfish_xds_connected {connected}
istio_agent_istiod_connection_failures_total 3.0
pilotfish_xds_last_update_timestamp_seconds 1000.0
pilotfish_xds_accepted_total{{type_url="type.googleapis.com/istio.networking.nds.v1.NameTable"}} {tables}
"""


def healthy(**changes: object) -> Facts:
    facts = {"now": 1090.0, "rules": {"nft": NAT.format(ssh=SSH_RETURN), "legacy": ""}, "ready": (200, ""),
             "metrics": METRICS.format(connected=1, tables=2),
             "certificate": Certificate("spiffe://cluster.local/ns/vmns/sa/vm", 1090.0 + 7200), "unit": "active"}
    return Facts(**{**facts, **changes})  # type: ignore[arg-type]


def test_status_is_all_ok_on_a_healthy_vm() -> None:
    results = checks(healthy())
    assert all(c.ok for c in results), results
    text = render(results)
    assert "OK    capture        nft: ISTIO_INBOUND, ISTIO_IN_REDIRECT, ISTIO_OUTPUT" in text
    assert "name table     received 2 version(s), last update 90s ago" in text
    assert "spiffe://cluster.local/ns/vmns/sa/vm" in text and "(2.0h left)" in text


@pytest.mark.parametrize(("changes", "check", "said"), [
    ({"rules": {"nft": "*nat\nCOMMIT\n", "legacy": ""}}, "capture", "no ISTIO_* chains"),
    ({"rules": {}}, "capture", "no iptables-save found"),
    ({"rules": {"nft": NAT.format(ssh=""), "legacy": ""}}, "capture", "inbound SSH (22) is captured"),
    ({"rules": {"nft": NAT.format(ssh=SSH_RETURN), "legacy": NAT.format(ssh=SSH_RETURN)}}, "capture",
     "more than one backend"),
    ({"ready": (503, "not ready: name table, certificate\n")}, "agent", "not ready (503): not ready: name table"),
    ({"ready": "[Errno 111] Connection refused"}, "agent", "not answering on its status port"),
    ({"certificate": Certificate("spiffe://x", 1000.0)}, "certificate", "expired at"),
    ({"certificate": "none at /etc/certs/cert-chain.pem"}, "certificate", "none at"),
    ({"metrics": METRICS.format(connected=1, tables=0)}, "name table", "none received"),
    ({"metrics": METRICS.format(connected=0, tables=1)}, "control plane", "not connected (3 failed attempts)"),
    ({"metrics": ""}, "control plane", "no metrics"),
    ({"unit": "failed"}, "unit", "pilotfish.service is failed"),
])
def test_status_names_what_fails(changes: dict[str, object], check: str, said: str) -> None:
    results = {c.name: c for c in checks(healthy(**changes))}
    assert not results[check].ok and said in results[check].detail, results[check]
    failing = {check, "name table"} if changes.get("metrics") == "" else {check}  # no metrics: both unknown
    assert {name for name, c in results.items() if not c.ok} == failing, results


def test_ssh_inside_an_explicit_inbound_port_list_is_not_captured() -> None:
    only = NAT.replace("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
                       "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT").format(ssh="")
    assert check_capture({"nft": only}).ok
