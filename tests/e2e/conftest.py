"""Makes the network-namespace harness of the init tests (tests/init/netns.py) importable: pytest
runs with --import-mode=importlib, which puts no test folder on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _folder in (_HERE, _HERE.parent / "init"):  # meshlab, and the network-namespace harness
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
