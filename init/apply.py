"""One run against the kernel: read the state, decide, apply all-or-nothing, roll back on failure.

istio-iptables restores each family in one `iptables-restore` call whose tables commit one by one,
so a failure in a later table leaves the earlier ones applied (docs/istio-compat.md
"istio-iptables rules"), and a reconcile
blocks traffic with DROP guardrails meanwhile. pilotfish saves every table it is about to
change first; if any table of any family fails, every table it committed is restored from that
snapshot, whole, and the run fails. Each table changes in one commit, so no guardrails are needed.

The caller holds the namespace lock (nslock.py) for the whole run, so no other pilotfish init
changes the tables between the snapshot and a rollback. Anything else might: before restoring a
table the rollback reads it again, and restores it only if it is exactly what this run committed;
a table someone else changed since is left alone and named in the error, because restoring it
would delete rules this run did not write. (A table another writer left holding exactly this run's
rules is indistinguishable from this run's commit; with the lock, only a writer that is not
pilotfish init and writes the sidecar's own rules could do that.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends import Backend, BackendError
from .planner import Plan
from .rules import Rule
from .restore import TABLES, TableState, parse_save
from .state import Transition, describe, transition, view

log = logging.getLogger("pilotfish.init")

Undo = Callable[[], None]


class ApplyError(RuntimeError):
    """The run failed; the message says what, and whether the rollback restored the tables."""


class Refused(ApplyError):
    """Rules from another configuration are present and neither --reconcile nor --force-apply
    was given (istio-iptables fails the same way, later, on the first existing chain)."""


@dataclass
class Result:
    """What a run did: whether it changed anything, and the diff lines."""

    changed: bool = False
    diff: list[str] = field(default_factory=list)


def snapshot_tables(save_text: str, tables: list[str], backend: Backend) -> str:
    """The given tables of an iptables-save dump, as restore input that puts them back whole; a
    table the dump lacks comes back as the backend can make it: gone (nft), empty (legacy)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in save_text.splitlines():
        if line.startswith("*"):
            current = blocks.setdefault(line[1:].strip(), [line])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return "".join(
        "".join(line + "\n" for line in blocks[table]) if table in blocks else backend.absent_table(table)
        for table in tables
    )


def run_tables(
    backend: Backend,
    plan: Plan,
    canon: Callable[[Rule, int], str],
    *,
    cleanup: bool = False,
    replace: bool = False,
    before: Callable[[], Undo] | None = None,
) -> Result:
    """Install `plan` (or, with `cleanup`, remove ours) in every family of the plan.

    `replace` allows replacing rules of another configuration (--reconcile, --force-apply);
    `before` runs once the run is decided, before the first table changes (the TPROXY routes and
    ::6, which do nothing without the rules and can be taken back exactly, unlike a legacy table
    once created); it returns how to undo what it did, which happens if a table then fails.
    """
    saved: dict[int, str] = {}
    moves: dict[int, Transition] = {}
    for family in plan.families:
        saved[family] = backend.save(family)
        moves[family] = transition(parse_save(saved[family]), plan.rules[family], _for_family(canon, family), cleanup)
    result = Result()
    for family, move in moves.items():
        result.diff += [f"ipv{family} {line}" for line in describe(parse_save(saved[family]), move.after)]
    result.changed = any(m.changes for m in moves.values())
    conflicts = [f"ipv{family} {table}" for family, move in moves.items() for table in move.conflicts]
    if not cleanup and conflicts and not replace:
        raise Refused(
            f"the namespace holds capture rules of another configuration ({', '.join(conflicts)}); rerun "
            "with --reconcile to replace them (or --cleanup-only with the old flags first). Differences:\n  "
            + "\n  ".join(result.diff)
        )
    attempted: list[int] = []
    undo: Undo | None = None
    try:
        if before is not None:
            undo = before()
        for family, move in moves.items():
            if move.changes:
                attempted.append(family)
                backend.apply(family, move.ops)
    except (BackendError, OSError) as err:
        status = _rollback(backend, saved, moves, attempted)
        if undo is not None:
            try:
                undo()
            except OSError as undo_err:
                status += f"; the routing set up before the tables could not be removed: {undo_err}"
        raise ApplyError(f"applying the rules failed: {err}; {status}") from None
    return result


def _for_family(canon: Callable[[Rule, int], str], family: int) -> Callable[[Rule], str]:
    def for_family(rule: Rule) -> str:
        return canon(rule, family)

    return for_family


def _rollback(backend: Backend, saved: dict[int, str], moves: dict[int, Transition], attempted: list[int]) -> str:
    """Put back every table this run changed, and only those: each table is read again and
    restored from the snapshot only if it holds exactly what this run wrote."""
    failed: list[str] = []
    foreign: list[str] = []
    kept: list[str] = []
    for family in attempted:
        try:
            current = parse_save(backend.save(family))
            snapshot = parse_save(saved[family])
            restore = []
            for table in TABLES:
                if not moves[family].ops.get(table):
                    continue
                verdict = _table_verdict(current.get(table), snapshot.get(table), moves[family].after[table])
                if verdict == "foreign":
                    foreign.append(f"ipv{family} {table}")
                elif verdict == "ours" or (verdict == "created" and backend.removes_tables):
                    restore.append(table)
                if verdict in ("ours", "created") and table not in snapshot and not backend.removes_tables:
                    kept.append(f"ipv{family} {table}")
            if restore:
                backend.restore_tables(family, snapshot_tables(saved[family], restore, backend))
        except BackendError as err:
            failed.append(f"ipv{family}: {err}")
    if failed:
        log.error("init: rollback failed, the namespace may hold partial rules: %s", "; ".join(failed))
        return "ROLLBACK FAILED, the namespace may hold partial rules: " + "; ".join(failed)
    notes = []
    if foreign:
        notes.append(f"not rolled back: {', '.join(foreign)}, changed by another process since this run wrote "
                     "it (restoring would delete rules this run did not write); it still holds this run's rules")
    if kept:
        notes.append(f"the {backend.name} table(s) {', '.join(kept)} did not exist before and remain, empty: the "
                     "kernel creates a legacy table on first use and cannot remove it")
    if notes:
        return "rolled back, except: " + "; ".join(notes)
    return "rolled back: the tables are as they were before this run"


def _table_verdict(current: TableState | None, snapshot: TableState | None, written: TableState) -> str:
    """What happened to one table since the snapshot: "untouched", "created" (there now, empty,
    absent from the snapshot), "ours" (exactly what this run wrote) or "foreign" (anything else)."""
    empty = TableState()
    now, before = current or empty, snapshot or empty
    if any(now.policies.get(chain) != policy for chain, policy in before.policies.items()):
        return "foreign"  # this run never changes a policy
    if view(now) == view(before):
        return "created" if current is not None and snapshot is None else "untouched"
    return "ours" if view(now) == view(written) else "foreign"
