"""`pilotfish init` as a command, in the ways that need no root: dry-run output, the file Istio's
DRY_RUN_FILE_PATH names, help, and global options before the subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PILOTFISH = str(Path(sys.executable).with_name("pilotfish"))
TEMPLATE = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
            "-d", "15090,15021,15020", "--ipv6", "off", "--dry-run"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PILOTFISH, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_dry_run_prints_restore_input_per_family() -> None:
    done = _run("init", *TEMPLATE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "# ipv4" and lines[1] == "*nat" and lines[-1] == "COMMIT"
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in lines
    assert "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN" in lines


def test_dry_run_file_path_gets_the_same_text(tmp_path: Path) -> None:
    target = tmp_path / "rules.txt"
    done = _run("init", *TEMPLATE, env={"DRY_RUN_FILE_PATH": str(target)})
    assert done.returncode == 0 and target.read_text() == done.stdout


def test_ipv6_dry_run_has_both_families() -> None:
    done = _run("init", *TEMPLATE[:-3], "--ipv6", "on", "--dry-run")
    assert done.stdout.count("# ipv4\n") == 1 and done.stdout.count("# ipv6\n") == 1
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in done.stdout


def test_global_log_level_before_init() -> None:
    done = _run("--log-level", "warning", "init", *TEMPLATE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# ipv4\n")


def test_help_and_bad_word() -> None:
    assert "pilotfish init clean" in _run("init", "--help").stdout
    done = _run("init", "install", *TEMPLATE)
    assert done.returncode == 1 and "unexpected argument 'install'" in done.stderr
