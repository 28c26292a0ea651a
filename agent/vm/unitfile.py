"""What the unit (deploy/vm/pilotfish.service) runs, read from its text: its commands in order
and its environment. `vm install` prints them where systemd does not run (a container, a
chroot), and the VM test runs them as systemd would (tests/e2e/test_vm.py). Pure.

Only the part of systemd's syntax the unit uses: one command per Exec line, the `+` prefix
(run with full privileges, not as User=), `-` before an optional EnvironmentFile, and
Environment= with space-separated assignments.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

STAGES = ("ExecStartPre", "ExecStart", "ExecStopPost")


@dataclass(frozen=True)
class UnitCommand:
    stage: str  # ExecStartPre, ExecStart or ExecStopPost
    privileged: bool  # `+`: as root; otherwise as the unit's User=
    argv: tuple[str, ...]


def unit_text() -> str:
    """The unit as shipped in the package (agent/vm/pilotfish.service, deploy/vm's file)."""
    return resources.files(__package__).joinpath("pilotfish.service").read_text()


def _entries(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def commands(text: str) -> list[UnitCommand]:
    """The Exec lines in the order systemd runs them: ExecStartPre, ExecStart, ExecStopPost."""
    found = []
    for key, value in _entries(text):
        if key in STAGES:
            privileged = value.startswith("+")
            found.append(UnitCommand(key, privileged, tuple(shlex.split(value.lstrip("+-@:!")))))
    return sorted(found, key=lambda c: STAGES.index(c.stage))


def user(text: str) -> str:
    return next((value for key, value in _entries(text) if key == "User"), "root")


def environment(text: str, read_env_file: Callable[[str], dict[str, str] | None]) -> dict[str, str]:
    """The unit's environment: its Environment= assignments, then its EnvironmentFile= files in
    order (`read_env_file(path)`, None when missing: an error unless the path has `-`), which
    override them as systemd's do (systemd.exec(5))."""
    env: dict[str, str] = {}
    for key, value in _entries(text):
        if key == "Environment":
            for word in shlex.split(value):
                name, _, setting = word.partition("=")
                env[name] = setting
    for key, value in _entries(text):
        if key == "EnvironmentFile":
            path = value.lstrip("-")
            found = read_env_file(path)
            if found is None and not value.startswith("-"):
                raise FileNotFoundError(f"EnvironmentFile {path} is missing")
            env.update(found or {})
    return env
