"""`pilotfish agent` refusing bad start-up input as a real process: one error line naming the
setting, exit status 2, no traceback, nothing started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from procs import PILOTFISH

DEEP_JSON = "[" * 5000 + "]" * 5000
DEEP_YAML = "a:\n  " + "- " * 5000 + "x\n"  # block sequences, one level per "- "


def run_agent(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The agent with `env` over a clean environment (no DNS proxy, no status port), which must
    exit by itself: every case here is refused before anything starts."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PILOT", "PROXY_CONFIG", "XDS_"))}
    return subprocess.run([PILOTFISH, "agent", "--status-port", "0", *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=30)


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2 with one ERROR line that carries every one of `words`, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("text", [DEEP_JSON, "a: " + DEEP_JSON, DEEP_YAML], ids=["json", "yaml-flow", "yaml-block"])
def test_deeply_nested_proxy_config_is_a_clear_error(tmp_path: Path, text: str) -> None:
    assert_refused(run_agent(tmp_path, {"PROXY_CONFIG": text}), "PROXY_CONFIG", "nested too deeply")
