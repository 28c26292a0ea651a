"""tests/kind/run.sh on a real cluster: the control plane and the standalone sample in both
injection forms, DNS through the proxy and mTLS between the two services (the script says what it
checks). Runs only where kind, kubectl, openssl, a Docker engine and the image are available;
the skip names what is missing. Marked `kind` (`pytest -m kind` runs only this)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "run.sh"
IMAGE = os.environ.get("IMAGE", "pilotfish:dev")


def missing() -> list[str]:
    """What the script needs and this machine lacks, in words."""
    gone = [f"`{tool}` is not installed" for tool in ("kind", "kubectl", "docker", "openssl")
            if shutil.which(tool) is None]
    if shutil.which("docker") is not None:
        engine = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
        if engine.returncode != 0:
            gone.append("no Docker engine answers `docker info`")
        else:
            image = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True, timeout=30,
                                   check=False)
            if image.returncode != 0:
                gone.append(f"the image {IMAGE} is not built (`make image`)")
    return gone


@pytest.mark.kind
@pytest.mark.timeout(1800)
def test_dns_and_mtls_between_two_services_on_kind() -> None:
    lacking = missing()
    if lacking:
        pytest.skip("kind test: " + "; ".join(lacking))
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1750, check=False)
    assert done.returncode == 0, done.stderr[-8000:]
    assert "passed:" in done.stderr
    assert done.stderr.count("mTLS: hello saw x-forwarded-client-cert") == len(
        os.environ.get("FORMS", "classic native-sidecar").split())
