"""Where a VM's parts go and what an installation records (docs/vm.md "What install changes").

The VM files land where Istio's VM install puts them, which is where the unit
(deploy/vm/pilotfish.service) and Istio's own istio-start.sh read them (both run with `/` as
working directory and read Istio's relative paths). Paths are kept relative to the root (`--root`,
`/` on a real VM). Pure: the manifest's model and the /etc/hosts block, no I/O.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .vmfiles import CLUSTER_ENV, MESH, ROOT_CERT, TOKEN

PROXY_ID = 1337  # istio-proxy's uid and gid (Istio's image and package)
PROXY_USER = "istio-proxy"
# Istio's VM files -> where they go, with their mode (the token: readable by istio-proxy's group only)
DESTINATIONS: dict[str, tuple[str, int]] = {
    CLUSTER_ENV: ("var/lib/istio/envoy/cluster.env", 0o644),
    MESH: ("etc/istio/config/mesh", 0o644),
    ROOT_CERT: ("etc/certs/root-cert.pem", 0o644),
    TOKEN: ("var/run/secrets/tokens/istio-token", 0o640),
}
# the directories the agent and Envoy write, owned by istio-proxy (the unit's ExecStartPre makes
# the same ones; ReadWritePaths= lets it write there)
PROXY_DIRS = ("etc/istio/proxy", "var/lib/istio/data", "etc/certs", "var/run/secrets/workload-spiffe-uds")
# what the agent writes beside the installed files (OUTPUT_CERTS=./etc/certs): removed on
# uninstall when install found none there
AGENT_OUTPUTS = ("etc/certs/key.pem", "etc/certs/cert-chain.pem")
UNIT = "etc/systemd/system/pilotfish.service"
UNIT_NAME = "pilotfish.service"
LINKS = ("usr/local/bin/pilot-agent", "usr/local/bin/envoy")
HOSTS_FILE = "etc/hosts"
MANIFEST = "var/lib/pilotfish/vm-install.json"
BACKUPS = "var/lib/pilotfish/replaced"  # files install replaced, put back by uninstall
HOSTS_BEGIN = "# BEGIN pilotfish vm: the control plane's address (removed by `pilotfish vm uninstall`)"
HOSTS_END = "# END pilotfish vm"
VERSION = 1


@dataclass
class Manifest:
    """Everything one `install` changed, so that `uninstall` undoes exactly that. Paths are
    relative to `root`; `dirs` in the order they were made."""

    root: str
    files: list[str] = field(default_factory=list)  # files and links made or replaced
    replaced: dict[str, str] = field(default_factory=dict)  # file -> its saved previous copy
    dirs: list[str] = field(default_factory=list)
    owners: dict[str, list[int]] = field(default_factory=dict)  # existing dir given to istio-proxy -> [uid, gid] before
    outputs: list[str] = field(default_factory=list)  # AGENT_OUTPUTS absent at install
    hosts_block: str = ""  # the exact text added to /etc/hosts
    user_created: bool = False
    group_created: bool = False
    version: int = VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} manifest")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def hosts_block(lines: tuple[str, ...], current: str) -> str:
    """The text appended to /etc/hosts (`current`): the lines between markers, after a newline
    when the file does not end with one."""
    if not lines:
        return ""
    lead = "\n" if current and not current.endswith("\n") else ""
    return lead + "\n".join((HOSTS_BEGIN, *lines, HOSTS_END)) + "\n"


def without_block(current: str, block: str) -> str | None:
    """/etc/hosts without the block install added; None when it is not there as added (edited
    since: left for the user, who is told)."""
    at = current.rfind(block)
    if not block or at < 0:
        return None
    return current[:at] + current[at + len(block):]
