"""The pure decisions: canonical rule text, what a run changes, the backend choice."""

from __future__ import annotations

import pytest

from pilotfish.init.backends import BackendError, Evidence, decide
from pilotfish.init.canonical import canonical
from pilotfish.init.config import CaptureConfig
from pilotfish.init.planner import Detected, Rule, plan
from pilotfish.init.restore import parse_save
from pilotfish.init.state import transition

USERS = {"root": "0"}
GROUPS = {"daemon": "1"}


def canon(rule: Rule, family: int = 4) -> str:
    return canonical(rule, family, USERS.__getitem__, GROUPS.__getitem__)


@pytest.mark.parametrize("args,family,saved", [
    (("-o", "lo", "!", "-d", "127.0.0.1/32", "-p", "tcp", "!", "--dport", "15008", "-m", "owner", "--uid-owner", "root",
      "-j", "ISTIO_IN_REDIRECT"), 4,
     "! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 0 -j ISTIO_IN_REDIRECT"),
    (("-p", "udp", "--dport", "53", "-d", "::127.0.0.53/128", "-j", "REDIRECT", "--to-port", "15053"), 6,
     "-d ::127.0.0.53/128 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"),
    (("-d", "10.1.2.3/8", "-j", "RETURN"), 4, "-d 10.0.0.0/8 -j RETURN"),
    (("!", "-d", "::1/128", "-p", "tcp", "-j", "TPROXY", "--tproxy-mark", "1337/0xffffffff", "--on-port", "15006"), 6,
     "! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff"),
    (("-p", "tcp", "-m", "mark", "--mark", "1337", "-j", "CONNMARK", "--save-mark"), 4,
     "-p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff"),
    (("-j", "MARK", "--set-mark", "1338"), 4, "-j MARK --set-xmark 0x53a/0xffffffff"),
    (("-m", "owner", "!", "--gid-owner", "daemon", "-m", "owner", "!", "--gid-owner", "202", "-j", "RETURN"), 4,
     "-m owner ! --gid-owner 1 -m owner ! --gid-owner 202 -j RETURN"),
    (("-p", "tcp", "--dport", "32000", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ISTIO_DIVERT"), 4,
     "-p tcp -m tcp --dport 32000 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT"),
    (("-p", "udp", "--sport", "15053", "-m", "owner", "--uid-owner", "3", "-j", "CT", "--zone", "2"), 4,
     "-p udp -m udp --sport 15053 -m owner --uid-owner 3 -j CT --zone 2"),
])
def test_canonical_is_what_iptables_save_prints(args: tuple[str, ...], family: int, saved: str) -> None:
    """Expected strings copied from iptables-save 1.8.9 (legacy and nft print them alike)."""
    assert canon(Rule("nat", "X", args), family) == saved


DEFAULT = plan(CaptureConfig(service_cidr="*", inbound_ports="*", local_exclude_ports="15090"), Detected())
FOREIGN = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KEEP - [0:0]\n-A OUTPUT -d 192.0.2.1/32 -j RETURN\n-A KEEP -j RETURN\nCOMMIT\n"


def _installed(extra: str = "") -> str:
    """A save dump of FOREIGN plus the default plan, as the kernel would show it."""
    move = transition(parse_save(FOREIGN), DEFAULT.rules[4], canon)
    lines = ["*nat"]
    for chain, policy in move.after["nat"].policies.items():
        lines.append(f":{chain} {policy or '-'} [0:0]")
    for chain, rules in move.after["nat"].rules.items():
        lines += [f"-A {chain} {r}" for r in rules]
    return "\n".join(lines + [extra, "COMMIT"]) + "\n"


def test_first_run_creates_chains_and_appends() -> None:
    move = transition(parse_save(FOREIGN), DEFAULT.rules[4], canon)
    kinds = [op.kind for op in move.ops["nat"]]
    assert not move.conflicts and move.changes
    assert kinds[:4] == ["new-chain"] * 4 and set(kinds[4:]) == {"rule"}
    assert move.after["nat"].rules["OUTPUT"][0] == "-d 192.0.2.1/32 -j RETURN"  # foreign rule kept, first


def test_rerun_with_the_same_plan_changes_nothing() -> None:
    move = transition(parse_save(_installed()), DEFAULT.rules[4], canon)
    assert not move.conflicts and not move.changes


def test_cleanup_removes_ours_and_keeps_foreign() -> None:
    move = transition(parse_save(_installed()), DEFAULT.rules[4], canon, cleanup=True)
    assert move.changes
    assert move.after["nat"].rules == {"PREROUTING": [], "OUTPUT": ["-d 192.0.2.1/32 -j RETURN"], "KEEP": ["-j RETURN"]}
    deletes = [op for op in move.ops["nat"] if op.kind == "delete"]
    assert [op.restore_line() for op in deletes] == ["-D PREROUTING 1", "-D OUTPUT 2"]


def test_cleanup_removes_the_plans_rules_in_builtin_chains() -> None:
    """TPROXY's mark rules live in built-in mangle chains and jump nowhere: only the plan tells."""
    tproxy = plan(CaptureConfig(inbound_interception_mode="TPROXY", inbound_ports="*"), Detected())
    installed = transition({}, tproxy.rules[4], canon).after
    move = transition(installed, tproxy.rules[4], canon, cleanup=True)
    assert move.after["mangle"].rules["OUTPUT"] == [] and move.after["mangle"].rules["PREROUTING"] == []


def test_changed_plan_flushes_chains_instead_of_recreating_them() -> None:
    other = plan(CaptureConfig(service_cidr="*", inbound_ports="8080"), Detected())
    move = transition(parse_save(_installed()), other.rules[4], canon)
    kinds = [op.kind for op in move.ops["nat"]]
    assert move.conflicts == ["nat"] and move.changes and "delete-chain" not in kinds and "new-chain" not in kinds
    assert "-p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in move.after["nat"].rules["ISTIO_INBOUND"]


def test_a_stray_jump_to_our_chain_counts_as_ours() -> None:
    move = transition(parse_save(_installed("-A PREROUTING -i eth9 -j ISTIO_INBOUND")), DEFAULT.rules[4], canon)
    assert move.changes and "-i eth9 -j ISTIO_INBOUND" not in move.after["nat"].rules["PREROUTING"]


@pytest.mark.parametrize("requested,legacy,nft,expect", [
    ("auto", Evidence(True, rules=5), Evidence(True), "legacy"),
    ("auto", Evidence(True), Evidence(True, rules=3), "nft"),
    ("auto", Evidence(True), Evidence(True), "nft"),
    ("auto", Evidence(True), Evidence(False, "no kernel support"), "legacy"),
    ("auto", Evidence(True, rules=2), Evidence(True, rules=9, sidecar_chains=True), "nft"),
    ("auto", Evidence(True, rules=2), Evidence(True, rules=9), "legacy"),
    ("nft", Evidence(True, rules=5), Evidence(True), "nft"),
])
def test_backend_choice(requested: str, legacy: Evidence, nft: Evidence, expect: str) -> None:
    name, reason = decide(requested, legacy, nft)
    assert name == expect and reason


def test_backend_choice_errors_say_why() -> None:
    with pytest.raises(BackendError, match="legacy: no kernel support; nft: iptables-nft-save not installed"):
        decide("auto", Evidence(False, "no kernel support"), Evidence(False, "iptables-nft-save not installed"))
    with pytest.raises(BackendError, match="--iptables-backend legacy: not usable here"):
        decide("legacy", Evidence(False, "gone"), Evidence(True))


def test_rule_arguments_grammar() -> None:
    from pilotfish.init.ruleargs import parse_rule_args

    parsed = parse_rule_args(("-o", "lo", "!", "-d", "::1/128", "-p", "tcp", "!", "--dport", "53", "-m", "owner",
                              "!", "--uid-owner", "3", "-j", "CONNMARK", "--save-mark"))
    assert parsed.base == {"-o": ("lo", False), "-d": ("::1/128", True), "-p": ("tcp", False)}
    assert [(m.name, m.options) for m in parsed.matches] == [
        ("tcp", [("dport", "53", True)]),  # implicit, as iptables loads it
        ("owner", [("uid-owner", "3", True)]),
    ]
    assert parsed.target is not None and parsed.target.options == [("save-mark", None, False)]
    with pytest.raises(ValueError, match="outside a match or target"):
        parse_rule_args(("--uid-owner", "3"))
