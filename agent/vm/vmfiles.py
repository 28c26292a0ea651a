"""Istio's VM files, as `istioctl x workload entry configure -o DIR` writes them, read and checked
before anything is installed (docs/vm.md "Install").

Every fault is an error naming the file and the line or key, so that `pilotfish vm install`
stops before it touches the system: a cluster.env line the shell would not read as one
assignment, a capture setting `pilot-agent istio-iptables` would refuse (the same check the
unit's ExecStartPre makes), a mesh.yaml whose defaultConfig the agent would refuse, a root
certificate that is not one, an empty or expired token, a hosts line without an address.

cluster.env is the one file changed on the way: inbound SSH (22) is never captured, so
ISTIO_LOCAL_EXCLUDE_PORTS gets 22 when it lacks it (istioctl writes `22,15090,15021,15020`; a
hand-written file may not), and an ISTIO_INBOUND_PORTS that names 22 is refused.

Pure but for `read_dir`, which reads the directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.settings import ConfigError
from pilotfish.common.tokens import token_expiry

CLUSTER_ENV, MESH, ROOT_CERT, TOKEN, HOSTS = "cluster.env", "mesh.yaml", "root-cert.pem", "istio-token", "hosts"
REQUIRED = (CLUSTER_ENV, MESH, ROOT_CERT, TOKEN)  # `hosts` may be missing or empty (istioctl: no known address)
MAX_FILE = 1 << 20  # each of them is a few KiB
SSH_PORT = 22
EXCLUDE_VAR, INBOUND_VAR = "ISTIO_LOCAL_EXCLUDE_PORTS", "ISTIO_INBOUND_PORTS"
ISTIOCTL_EXCLUDES = "22,15090,15021,15020"  # what istioctl writes: SSH and the sidecar's own ports
_ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class VmFileError(ConfigError):
    """A VM file is missing or wrong; the message names the file and the line or key."""


@dataclass(frozen=True)
class VmFiles:
    """What will be installed: each file's bytes (cluster.env as amended), its variables, the
    lines for /etc/hosts, and what was amended or assumed (said to the user)."""

    contents: Mapping[str, bytes]
    env: Mapping[str, str]
    hosts: tuple[str, ...]
    notes: tuple[str, ...]


def parse_env_file(text: str, name: str = CLUSTER_ENV) -> dict[str, str]:
    """`KEY=value` lines, values quoted as the shell quotes them (istioctl quotes with
    shellescape: bare, '...' and '"'"'); blank lines and `#` comments skipped. What istio-start.sh
    (`set -a; . cluster.env`) and systemd's EnvironmentFile= both read the same way."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ASSIGNMENT.match(stripped)
        if match is None:
            raise VmFileError(f"{name} line {number}: want KEY=value, got {_shown(stripped)}")
        key, raw = match.groups()
        try:
            words = shlex.split(raw, comments=False, posix=True)
        except ValueError as err:
            raise VmFileError(f"{name} line {number}: {key}: {err} in {_shown(raw)}") from None
        if len(words) > 1:
            raise VmFileError(f"{name} line {number}: {key}: want one value (quote it), got {_shown(raw)}")
        env[key] = words[0] if words else ""
    return env


def _shown(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _covers(ports: str, port: int) -> bool:
    """Whether Istio's port list (`a,b,c:d`) holds `port` (bad items are the capture check's)."""
    for item in (p for p in ports.split(",") if p):
        first, _, last = item.partition(":")
        if first.isdigit() and (last or first).isdigit() and int(first) <= port <= int(last or first):
            return True
    return False


def with_ssh_excluded(text: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(cluster.env with 22 in ISTIO_LOCAL_EXCLUDE_PORTS, what was changed or None). A line
    already there is rewritten in place; a missing one is added with istioctl's value."""
    if EXCLUDE_VAR not in env:
        line = f"{EXCLUDE_VAR}={ISTIOCTL_EXCLUDES}\n"
        return (text if not text or text.endswith("\n") else text + "\n") + line, \
            f"{CLUSTER_ENV}: added {EXCLUDE_VAR}={ISTIOCTL_EXCLUDES} (inbound SSH is never captured)"
    if _covers(env[EXCLUDE_VAR], SSH_PORT):
        return text, None
    value = ",".join(p for p in (str(SSH_PORT), env[EXCLUDE_VAR]) if p)
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = _ASSIGNMENT.match(line.strip())
        if match and match.group(1) == EXCLUDE_VAR:
            lines[i] = f"{EXCLUDE_VAR}={shlex.quote(value)}\n"
    return "".join(lines), f"{CLUSTER_ENV}: {EXCLUDE_VAR} is now {value} (inbound SSH is never captured)"


def check_capture(env: Mapping[str, str]) -> None:
    """The capture settings as `pilot-agent istio-iptables` reads them from the environment."""
    from pilotfish.init.config import parse_args, validate

    try:
        validate(parse_args([], env)[0])
    except ConfigError as err:
        raise VmFileError(f"{CLUSTER_ENV}: {err}") from None
    inbound = env.get(INBOUND_VAR, "")
    if inbound != "*" and _covers(inbound, SSH_PORT):
        raise VmFileError(f"{CLUSTER_ENV}: {INBOUND_VAR}={inbound!r} captures inbound SSH (port {SSH_PORT}): "
                          f"the VM would be reachable over SSH only through the mesh; leave {SSH_PORT} out")


def check_mesh(text: str) -> None:
    """mesh.yaml's defaultConfig as the agent reads it (agent/meshconfig.py)."""
    from pilotfish.agent.meshconfig import ConfigSources, effective_proxy_config

    try:
        effective_proxy_config(ConfigSources(mesh=text, mesh_path=MESH))
    except ConfigError as err:
        raise VmFileError(str(err).replace(f"mesh config file {MESH}", MESH, 1)) from None


def check_root_cert(data: bytes, now: datetime) -> None:
    """One or more PEM certificates, none expired."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise VmFileError(f"{ROOT_CERT}: not a PEM certificate: {err}") from None
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise VmFileError(f"{ROOT_CERT}: the certificate {cert.subject.rfc4514_string()!r} expired on "
                              f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")


def check_token(data: bytes, now: datetime) -> None:
    """A one-line token; when it is a JWT, not expired (istioctl's last an hour: `--tokenDuration`)."""
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise VmFileError(f"{TOKEN}: not ASCII text") from None
    if not token:
        raise VmFileError(f"{TOKEN}: empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise VmFileError(f"{TOKEN}: want one line without spaces (a bearer token)")
    expiry = token_expiry(token)
    if expiry is not None and expiry < now.timestamp():
        when = datetime.fromtimestamp(expiry, UTC)
        raise VmFileError(f"{TOKEN}: the token expired at {when:%Y-%m-%dT%H:%M:%SZ}; generate the VM files again "
                          "(istioctl x workload entry configure) and install them within --tokenDuration")


# a host name as /etc/hosts takes one (RFC 1123 labels, dots): the lines are written as root
# into a file every resolver on the VM reads, so nothing else gets through
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def parse_hosts(text: str) -> tuple[str, ...]:
    """The `address name...` lines (comments and blank lines dropped), normalised to one space."""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            ipaddress.ip_address(fields[0])
        except ValueError:
            raise VmFileError(f"{HOSTS} line {number}: want an IP address first, got {_shown(fields[0])}") from None
        if len(fields) < 2:
            raise VmFileError(f"{HOSTS} line {number}: {fields[0]} names no host")
        for name in fields[1:]:
            if not HOST_NAME.fullmatch(name):
                raise VmFileError(f"{HOSTS} line {number}: {_shown(name)} is not a host name")
        lines.append(" ".join(fields))
    return tuple(lines)


def check_files(read: Callable[[str], bytes | None], now: datetime) -> VmFiles:
    """Every file read (None: missing) and checked, in the order a user fixes them."""
    contents: dict[str, bytes] = {}
    for name in REQUIRED:
        data = read(name)
        if data is None:
            raise VmFileError(f"{name}: missing (istioctl x workload entry configure -o DIR writes it)")
        contents[name] = data
    notes: list[str] = []
    try:
        text = contents[CLUSTER_ENV].decode("utf-8")
    except UnicodeDecodeError:
        raise VmFileError(f"{CLUSTER_ENV}: not UTF-8 text") from None
    env = parse_env_file(text)
    check_capture(env)
    text, note = with_ssh_excluded(text, env)
    if note:
        notes.append(note)
        env = parse_env_file(text)
    contents[CLUSTER_ENV] = text.encode()
    check_mesh(contents[MESH].decode("utf-8", "replace"))
    check_root_cert(contents[ROOT_CERT], now)
    check_token(contents[TOKEN], now)
    hosts_data = read(HOSTS)
    hosts = parse_hosts(hosts_data.decode("utf-8", "replace")) if hosts_data is not None else ()
    if not hosts:
        notes.append(f"{HOSTS}: no address for the control plane; /etc/hosts is left as it is "
                     "(its name must resolve some other way)")
    return VmFiles(contents, env, hosts, tuple(notes))


def read_dir(directory: str, now: datetime | None = None) -> VmFiles:
    """The files of `directory`, checked (VmFileError naming the file)."""
    if not os.path.isdir(directory):
        raise VmFileError(f"--files: not a directory: {directory}")

    def read(name: str) -> bytes | None:
        # not through a link: install runs as root and makes the token readable by istio-proxy
        # and mesh.yaml by everyone, so a link in a directory another user prepared would copy
        # any file root can read (a kubeconfig passes as a mesh.yaml) where they can read it
        path = os.path.join(directory, name)
        try:
            return read_regular_file(path, MAX_FILE, follow=False)
        except UnreadableFile as err:
            if err.missing:
                return None
            raise VmFileError(f"{name}: {err}: {path}") from None

    return check_files(read, now or datetime.now(UTC))
