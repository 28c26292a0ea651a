"""docs/reference.md is what `pilotfish reference` prints (agent/reference.py), and the generator
finds the variables the code reads, however it reads them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from procs import PILOTFISH

from pilotfish.agent.reference import environment_reads

DOC = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def test_the_committed_reference_is_the_generated_one() -> None:
    generated = subprocess.run([PILOTFISH, "reference"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert DOC.read_text() == generated, "docs/reference.md is stale: run `.venv/bin/pilotfish reference > docs/reference.md`"


def test_variables_read_every_way_are_found() -> None:
    found = environment_reads()
    for name in ("PROXY_CONFIG",  # env.get("X")
                 "ISTIO_KUBE_APP_PROBERS",  # through a module constant
                 "EXIT_ON_ZERO_ACTIVE_CONNECTIONS",  # a helper given (env, "X")
                 "METRICS_LOCALHOST_ACCESS_ONLY",  # a helper given ({**env, ...}, "X")
                 "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS",  # name = "X"; meta.get(name)
                 "XDS_HEADER_*", "ISTIO_META_*",  # families by prefix
                 "NOTIFY_SOCKET", "DNS_FORWARD_TIMEOUT", "SECRET_TTL"):
        assert name in found, name
