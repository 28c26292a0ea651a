"""The files `pilotfish dns` is told to read (--resolv-conf, --name-table) may be anything: a FIFO
hung it at start, a huge file was read whole. Each is one error line naming the flag and the
path, exit 2, before anything is bound."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from clirun import run_cli

from pilotfish.dns.config import RESOLV_CONF_MAX


def _run(tmp_path: Path, resolv: str, table: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["dns", "--name-table", table, "--resolv-conf", resolv, "--listen", "127.0.0.1:0"])


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "table.json").write_text('{"table": {}}')
    os.mkfifo(tmp_path / "fifo")
    with open(tmp_path / "huge", "wb") as f:
        f.truncate(RESOLV_CONF_MAX + 1)
    return {name: str(tmp_path / name) for name in ("resolv.conf", "table.json", "fifo", "huge")} | {"dir": str(tmp_path)}


@pytest.mark.parametrize(
    "which,why",
    [("fifo", "is not a regular file"), ("dir", "is a directory"), ("huge", "is larger than 10 MiB")],
)
def test_resolv_conf_that_is_not_a_sane_file_exits_2(tmp_path: Path, paths: dict[str, str], which: str, why: str) -> None:
    done = _run(tmp_path, paths[which], paths["table.json"])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and f"--resolv-conf: cannot read {paths[which]}: {why}" in lines[0]


@pytest.mark.parametrize("which,why", [("fifo", "is not a regular file"), ("dir", "is a directory")])
def test_table_file_that_is_not_a_file_exits_2(tmp_path: Path, paths: dict[str, str], which: str, why: str) -> None:
    done = _run(tmp_path, paths["resolv.conf"], paths[which])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and f"{paths[which]}: {why}" in lines[0]


def test_the_agent_reads_resolv_conf_the_same_way(paths: dict[str, str]) -> None:
    """`pilotfish agent` builds its DNS settings with the same dns_config."""
    import argparse

    from pilotfish.dns.command import add_dns_arguments, dns_config
    from pilotfish.common.settings import ConfigError

    parser = argparse.ArgumentParser()
    add_dns_arguments(parser)
    with pytest.raises(ConfigError, match=f"^--resolv-conf: cannot read {paths['fifo']}: is not a regular file$"):
        dns_config(parser.parse_args(["--resolv-conf", paths["fifo"]]), {}, is_root=False)
