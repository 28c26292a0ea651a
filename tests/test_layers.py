"""The packages depend downward only (issue 8): `common` <- `dns`, `init`, `xds_client` <- `agent`,
`controlplane`; nothing imports `agent` but the CLI (pilotfish.agent.cli, which imports the
chosen subcommand's module). Every import in every module is read from its source (ast), the
lazy ones inside functions included, so an edge cannot hide behind a late import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "dns", "init", "xds_client", "agent", "controlplane")
ALLOWED = {
    "common": set(),
    "dns": {"common"},
    "init": {"common"},
    "xds_client": {"common"},
    "agent": {"common", "dns", "init", "xds_client"},
    "controlplane": {"common", "xds_client"},
}
CLI = "agent/cli.py"  # the entry point: it may import any subcommand


def _imported_packages(path: Path, package: str) -> set[str]:
    """The pilotfish packages a module imports (absolute `pilotfish.X` and relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside its own package
                names = [f"pilotfish.{package}"]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "pilotfish" and len(parts) > 1 and parts[1] in PACKAGES:
                found.add(parts[1])
    return found - {package}


def edges() -> dict[str, set[str]]:
    """module path -> the other pilotfish packages it imports."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if "/proto/" in rel:
                continue  # generated protobuf modules
            out[rel] = _imported_packages(path, package)
    return out


def test_packages_depend_downward_only() -> None:
    wrong = {
        module: sorted(targets - ALLOWED[module.split("/")[0]])
        for module, targets in edges().items()
        if module != CLI and targets - ALLOWED[module.split("/")[0]]
    }
    assert wrong == {}, f"upward or sideways imports: {wrong}"


def test_the_allowed_graph_has_no_cycle() -> None:
    seen: dict[str, int] = {}

    def visit(package: str) -> None:
        assert seen.get(package) != 1, f"cycle through {package}"
        if seen.get(package) == 2:
            return
        seen[package] = 1
        for target in ALLOWED[package]:
            visit(target)
        seen[package] = 2

    for package in PACKAGES:
        visit(package)


def test_the_walk_finds_an_upward_edge(tmp_path: Path) -> None:
    """The checker itself: a lazy import of the agent from init is found."""
    module = tmp_path / "x.py"
    module.write_text("def f():\n    from pilotfish.agent.logs import setup_logging\n    from . import y\n")
    assert _imported_packages(module, "init") == {"agent"}
