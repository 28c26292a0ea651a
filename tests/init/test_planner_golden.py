"""The planner against istio-iptables' own golden files: for every case, with its detected values
injected, `pilotfish init --dry-run`'s restore blocks equal the golden's: same chains, and in
each chain the same rules in the same order."""

from __future__ import annotations

import pytest
from golden import CASES, DATA, case_config

from pilotfish.init.planner import plan
from pilotfish.init.restore import dry_run_text


def blocks(lines: list[str]) -> list[dict[str, dict[str, list[str]]]]:
    """Restore blocks (one per family) as {table: {chain: rule lines, "-N": declared chains}};
    a block starts at a table header after a COMMIT of another family or at the first table."""
    families: list[dict[str, dict[str, list[str]]]] = []
    seen_tables: set[str] = set()
    table = None
    for line in lines:
        line = line.strip()
        if line.startswith("*"):
            name = line[1:].strip()
            if not families or name in seen_tables:
                families.append({})
                seen_tables = set()
            seen_tables.add(name)
            table = families[-1].setdefault(name, {})
        elif line.startswith("-N ") and table is not None:
            table.setdefault("-N", []).append(line[3:])
        elif line.startswith(("-A ", "-I ")) and table is not None:
            chain = line.split()[1]
            table.setdefault(chain, []).append(line)
    return families


def golden_blocks(name: str) -> list[dict[str, dict[str, list[str]]]]:
    text = (DATA / f"{name}.golden").read_text()
    return blocks([l for l in text.splitlines() if not l.endswith("-save")])


@pytest.mark.parametrize("name", CASES)
def test_dry_run_matches_istio_golden(name: str) -> None:
    config, detected = case_config(name)
    text = dry_run_text(plan(config, detected))
    ours = blocks([l for l in text.splitlines() if not l.startswith("#")])
    theirs = golden_blocks(name)
    assert len(ours) == len(theirs)
    for got, want in zip(ours, theirs):
        assert set(got) == set(want)
        for table in want:
            # Same chains (the order of -N lines may differ), same rules per chain, same order.
            assert sorted(got[table].get("-N", [])) == sorted(want[table].get("-N", [])), table
            assert {k: v for k, v in got[table].items() if k != "-N"} == {
                k: v for k, v in want[table].items() if k != "-N"
            }, table


def test_dry_run_format() -> None:
    config, detected = case_config("dns-uid-gid")
    text = dry_run_text(plan(config, detected))
    assert text.startswith("# ipv4\n*mangle\n") or text.startswith("# ipv4\n*nat\n")
    assert text.count("# ipv6\n") == 1 and text.endswith("COMMIT\n")
