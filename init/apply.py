"""One run against the kernel: read the state, decide, apply all-or-nothing, roll back on failure.

istio-iptables restores each family in one `iptables-restore` call whose tables commit one by one,
so a failure in a later table leaves the earlier ones applied (reference §12.3), and a reconcile
blocks traffic with DROP guardrails meanwhile. pilotfish saves every table it is about to
change first; if any table of any family fails (or the TPROXY routes that follow), every changed
table is restored from that snapshot, whole, and the run fails. Each table changes in one commit,
so no guardrails are needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends import Backend, BackendError
from .planner import Plan, Rule
from .restore import TABLES, parse_save
from .state import Transition, describe, transition

log = logging.getLogger("pilotfish.init")

# The built-in chains of each table, for restoring a table the snapshot did not have.
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}


class ApplyError(RuntimeError):
    """The run failed; the message says what, and whether the rollback restored the tables."""


class Refused(ApplyError):
    """Rules from another configuration are present and neither --reconcile nor --force-apply
    was given (istio-iptables fails the same way, later, on the first existing chain)."""


@dataclass
class Result:
    """What a run did: `changed` per family, the diff lines, whether any was already there."""

    changed: bool = False
    diff: list[str] = field(default_factory=list)
    residue: bool = False


def snapshot_tables(save_text: str, tables: list[str]) -> str:
    """The given tables of an iptables-save dump, as restore input that puts them back whole; a
    table the dump lacks comes back empty, with ACCEPT policies."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = blocks.setdefault(line[1:].strip(), [line])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    out = []
    for table in tables:
        lines = blocks.get(table) or [f"*{table}"] + [f":{c} ACCEPT [0:0]" for c in BUILTIN_CHAINS[table]] + ["COMMIT"]
        out += lines
    return "".join(line + "\n" for line in out)


def run_tables(
    backend: Backend,
    plan: Plan,
    canon: Callable[[Rule, int], str],
    *,
    cleanup: bool = False,
    replace: bool = False,
    after: Callable[[], None] | None = None,
) -> Result:
    """Install `plan` (or, with `cleanup`, remove ours) in every family of the plan.

    `replace` allows replacing rules of another configuration (--reconcile, --force-apply);
    `after` runs once the tables are in place (the TPROXY routes); if it raises, the tables are
    rolled back too.
    """
    saved: dict[int, str] = {}
    moves: dict[int, Transition] = {}
    for family in plan.families:
        saved[family] = backend.save(family)
        moves[family] = transition(parse_save(saved[family]), plan.rules[family], _for_family(canon, family), cleanup)
    result = Result()
    for family, move in moves.items():
        result.residue |= move.residue
        result.diff += [f"ipv{family} {line}" for line in describe(parse_save(saved[family]), move.after)]
    result.changed = any(m.changes for m in moves.values())
    if not cleanup and result.changed and result.residue and not replace:
        raise Refused(
            "the namespace holds capture rules of another configuration; rerun with --reconcile to "
            "replace them (or --cleanup-only with the old flags first). Differences:\n  "
            + "\n  ".join(result.diff)
        )
    done: list[int] = []
    try:
        for family, move in moves.items():
            if move.changes:
                done.append(family)
                backend.apply(family, move.ops)
        if after is not None:
            after()
    except (BackendError, OSError) as err:
        status = _rollback(backend, saved, moves, done)
        raise ApplyError(f"applying the rules failed: {err}; {status}") from None
    return result


def _for_family(canon: Callable[[Rule, int], str], family: int) -> Callable[[Rule], str]:
    def for_family(rule: Rule) -> str:
        return canon(rule, family)

    return for_family


def _rollback(backend: Backend, saved: dict[int, str], moves: dict[int, Transition], done: list[int]) -> str:
    problems = []
    for family in done:
        tables = [t for t in TABLES if moves[family].ops.get(t)]
        try:
            backend.restore_tables(family, snapshot_tables(saved[family], tables))
        except BackendError as err:
            problems.append(f"ipv{family}: {err}")
    if problems:
        log.error("init: rollback failed, the namespace may hold partial rules: %s", "; ".join(problems))
        return "ROLLBACK FAILED, the namespace may hold partial rules: " + "; ".join(problems)
    return "rolled back: the tables are as they were before this run"
