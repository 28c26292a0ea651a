"""From the live tables and a plan to the operations that install it, remove it, or nothing. Pure.

What counts as pilotfish's (and Istio's, whose place it takes): the sidecar's ISTIO_* chains,
every rule in a built-in chain that jumps to one of them, and the rules of the current plan that
live in built-in chains (interface exclusions, the TPROXY marks). Everything else is foreign and is
never touched.

Operations per table, in an order both backends can apply in one commit: delete our rules from
built-in chains (highest index first), flush our chains, delete the ones the plan no longer has,
create the ones it adds, then add the planned rules in emission order. Chains that stay are
flushed rather than deleted and re-created, which nft cannot do in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from .rules import Rule
from .restore import BUILTIN_TARGETS, TABLES, TableState

OUR_CHAINS = frozenset((
    "ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS",
    "ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_DROP",
))
Canon = Callable[[Rule], str]


class OpKind(StrEnum):
    """What an op does to a table."""

    DELETE = "delete"  # delete rule `index` (1-based) of the chain
    FLUSH = "flush"
    DELETE_CHAIN = "delete-chain"
    NEW_CHAIN = "new-chain"
    RULE = "rule"  # append `rule`, or insert it at `rule.insert`


# iptables-restore's command for each kind but RULE (whose line is the rule's own text)
_RESTORE_COMMAND = {OpKind.DELETE: "-D", OpKind.FLUSH: "-F", OpKind.DELETE_CHAIN: "-X", OpKind.NEW_CHAIN: "-N"}


@dataclass(frozen=True)
class Op:
    """One change to a table."""

    kind: OpKind
    chain: str
    index: int = 0
    rule: Rule | None = None

    def restore_line(self) -> str:
        """The op as an iptables-restore (`--noflush`) line."""
        if self.kind is OpKind.RULE:
            assert self.rule is not None
            return self.rule.text()
        line = f"{_RESTORE_COMMAND[self.kind]} {self.chain}"
        return f"{line} {self.index}" if self.kind is OpKind.DELETE else line


@dataclass
class Transition:
    """What a run does to one family: ops per table, the tables as they will be, and the tables
    where rules of ours that differ from the plan are there already (`conflicts`).

    A table that holds exactly the plan's rules, or none of ours, is no conflict: that is what an
    install of this configuration killed half way leaves (each table is one commit, so a table is
    all or nothing), and a rerun completes it. A table holding ours but not the plan's is another
    configuration (or a stray rule of ours): replacing it takes --reconcile.
    """

    ops: dict[str, list[Op]] = field(default_factory=dict)
    after: dict[str, TableState] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return any(self.ops.values())


def _target(line: str) -> str | None:
    words = line.split()
    return words[words.index("-j") + 1] if "-j" in words else None


def _is_ours(chain: str, line: str, planned_builtin: set[tuple[str, str]]) -> bool:
    return _target(line) in OUR_CHAINS or (chain, line) in planned_builtin


def transition(current: dict[str, TableState], planned: Iterable[Rule], canon: Canon, cleanup: bool = False) -> Transition:
    """The ops that take `current` to (current without ours) + planned; with `cleanup`, to
    current without ours (the plan still says which rules in built-in chains are ours). Tables
    whose content would not change get no ops at all."""
    rules = list(planned)
    result = Transition()
    for table in TABLES:
        state = current.get(table, TableState())
        mine = [r for r in rules if r.table == table]
        builtin = {(r.chain, canon(r)) for r in mine if r.chain in BUILTIN_TARGETS}
        ops: list[Op] = []
        ours_present = [c for c in state.rules if c in OUR_CHAINS]
        for chain, lines in state.rules.items():
            if chain in OUR_CHAINS:
                continue
            for index in range(len(lines), 0, -1):
                if _is_ours(chain, lines[index - 1], builtin):
                    ops.append(Op(OpKind.DELETE, chain, index))
        had_ours = bool(ours_present) or bool(ops)
        ops += [Op(OpKind.FLUSH, c) for c in ours_present]
        planned_chains: list[str] = []
        for rule in [] if cleanup else mine:
            for name in (rule.chain, rule.target):
                if name and name not in BUILTIN_TARGETS and name in OUR_CHAINS and name not in planned_chains:
                    planned_chains.append(name)
        ops += [Op(OpKind.DELETE_CHAIN, c) for c in ours_present if c not in planned_chains]
        ops += [Op(OpKind.NEW_CHAIN, c) for c in planned_chains if c not in state.rules]
        if not cleanup:
            ops += [Op(OpKind.RULE, r.chain, rule=r) for r in mine]
        after = _simulate(state, ops, canon)
        if view(after) == view(state):
            ops = []
        if had_ours and ops:
            result.conflicts.append(table)
        result.ops[table] = ops
        result.after[table] = after
    return result


def _simulate(state: TableState, ops: list[Op], canon: Canon) -> TableState:
    rules = {chain: list(lines) for chain, lines in state.rules.items()}
    for op in ops:
        if op.kind is OpKind.DELETE:
            del rules[op.chain][op.index - 1]
        elif op.kind is OpKind.FLUSH:
            rules[op.chain] = []
        elif op.kind is OpKind.DELETE_CHAIN:
            del rules[op.chain]
        elif op.kind is OpKind.NEW_CHAIN:
            rules[op.chain] = []
        elif op.rule is not None:
            chain = rules.setdefault(op.chain, [])
            line = canon(op.rule)
            if op.rule.insert is None:
                chain.append(line)
            else:
                chain.insert(op.rule.insert - 1, line)
    policies = {c: state.policies.get(c) for c in rules}
    return TableState(policies, rules)


def view(state: TableState) -> dict[str, list[str]]:
    """What matters for equality: user chains (even empty) and every chain's rules."""
    return {c: r for c, r in state.rules.items() if r or c not in BUILTIN_TARGETS}


def describe(before: dict[str, TableState], after: dict[str, TableState]) -> list[str]:
    """A readable diff (`- table chain rule` / `+ ...`) for logs and error messages."""
    out = []
    for table in TABLES:
        old = view(before.get(table, TableState()))
        new = view(after.get(table, TableState()))
        for chain in sorted(set(old) | set(new)):
            a, b = old.get(chain, []), new.get(chain, [])
            if chain not in new:
                out.append(f"- {table} chain {chain}")
            elif chain not in old:
                out.append(f"+ {table} chain {chain}")
            out += [f"- {table} {chain} {line}" for line in a if line not in b]
            out += [f"+ {table} {chain} {line}" for line in b if line not in a]
    return out
