"""iptables-restore text: writing a plan the way istio-iptables writes it (docs/istio-compat.md
"istio-iptables rules"), and reading
`iptables-save` output back into tables, chains and rules. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .planner import Plan
from .rules import Rule

BUILTIN_TARGETS = frozenset(("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"))
TABLES = ("filter", "mangle", "nat", "raw")  # the order iptables-save and Istio print them in
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}


def restore_text(rules: Iterable[Rule]) -> str:
    """One family's rules as `iptables-restore --noflush` input: per table (alphabetical), the
    chains to create in order of first appearance (then trailing jump targets), then the rules
    in emission order."""
    chains: dict[str, list[str]] = {}
    lines: dict[str, list[str]] = {}
    rules = list(rules)
    for rule in rules:
        declared = chains.setdefault(rule.table, [])
        if rule.chain not in BUILTIN_TARGETS and rule.chain not in declared:
            declared.append(rule.chain)
    for rule in rules:
        target = rule.target
        declared = chains[rule.table]
        if target and target not in BUILTIN_TARGETS and target not in declared:
            declared.append(target)
    for rule in rules:
        lines.setdefault(rule.table, []).append(rule.text())
    out = []
    for table in sorted(lines):
        out.append(f"*{table}")
        out += [f"-N {chain}" for chain in chains[table]]
        out += lines[table]
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def dry_run_text(plan: Plan) -> str:
    """What `--dry-run` prints: per family a `# ipv4` / `# ipv6` line, then its restore input."""
    return "".join(f"# {FAMILY_NAMES[f]}\n" + restore_text(plan.rules[f]) for f in plan.families)


@dataclass
class TableState:
    """A table as iptables-save shows it: chain policies (None for user chains), rule lines per
    chain in kernel order (each line without its `-A CHAIN ` prefix)."""

    policies: dict[str, str | None] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)


def parse_save(text: str) -> dict[str, TableState]:
    """Tables of `iptables-save` output (comments and counters ignored)."""
    tables: dict[str, TableState] = {}
    current: TableState | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), TableState())
        elif current is None:
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            current.policies[name] = None if policy == "-" else policy
            current.rules.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            current.rules.setdefault(chain, []).append(rest)
    return tables
