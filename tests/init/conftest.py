"""pytest set-up for the ``pilotfish init`` capture tests in real network namespaces.

The project runs pytest with ``--import-mode=importlib``, which does not put test folders on
``sys.path``; the harness module next to the tests (``netns``) is made importable here. The
probe script ``nsprobe.py`` is never imported: it runs inside the namespaces as a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
