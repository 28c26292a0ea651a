"""Makes the network-namespace harness of the init tests (tests/init/netns.py) importable: pytest
runs with --import-mode=importlib, which puts no test folder on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

_INIT = str(Path(__file__).resolve().parent.parent / "init")
if _INIT not in sys.path:
    sys.path.insert(0, _INIT)
