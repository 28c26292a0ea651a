"""The pilotfish image, built once per session for the container tests (test_image.py,
test_vm_systemd.py) as `make image` builds it; they skip where no Docker engine can be had."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from containers import builder  # noqa: E402


@pytest.fixture(scope="session")
def image() -> str:
    try:
        builder.ensure_engine()
    except builder.Unavailable as err:
        pytest.skip(f"no Docker engine: {err}")
    return str(builder.build(python=sys.executable))
