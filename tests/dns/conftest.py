"""pytest set-up for the DNS proxy tests.

The project runs pytest with ``--import-mode=importlib``, which does not put test folders on
``sys.path``; the helper modules next to the tests (``mock_upstream``, ``proxy_harness``) are
made importable here, under names that cannot collide with the ``pilotfish`` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
