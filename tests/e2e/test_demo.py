"""`make demo` (demo/mesh.py) as CI runs it: every step shows what it says, twice in a row (it
cleans up after itself), and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pod_harness import skip_reason as pod_skip_reason

DEMO = Path(__file__).resolve().parents[2] / "demo" / "mesh.py"


@pytest.mark.timeout(180)
def test_the_demo_shows_the_mesh_and_can_run_again() -> None:
    reason = pod_skip_reason()
    if reason:
        pytest.skip(reason)
    for _ in range(2):
        done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120, check=False)
        out = done.stdout
        assert done.returncode == 0, out + done.stderr
        assert "dig +search +short reviews\n   10.96.0.12" in out, out
        assert ("reviews (called by spiffe://cluster.local/ns/default/sa/bookinfo-productpage)\n"
                "     ratings (called by spiffe://cluster.local/ns/default/sa/bookinfo-reviews)") in out, out
        assert out.count("ratings (called by spiffe://") == 2, out  # before and after the control plane stops
        assert "echo: hello mongodb" in out and "93.184.215.14" in out, out
        plain = out.split("productpage$ curl -sS -m 5 http://10.244.0.12:9080/\n", 1)[1].splitlines()[0]
        assert plain.strip().startswith("curl: ("), out  # STRICT refuses plain text: reset or closed, no answer
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert "pfdemo-" not in listed, listed
