"""The form `iptables-save` prints a planned rule in, so the live state can be compared with a plan
without asking the kernel rule by rule (Istio runs `iptables -C` per rule and compares counts).

iptables-save rewrites what it was given: addresses masked and printed by glibc's inet_ntop,
the implicit `-m tcp` made explicit, the base match fields first (`-s -d -i -o -p`), marks in
hex, users and groups as numbers, and some targets with their defaults spelled out
(`MARK --set-xmark 0x53a/0xffffffff`, `TPROXY --on-port P --on-ip 0.0.0.0 --tproxy-mark ...`).
This module does the same for the vocabulary the planner uses. iptables 1.8's legacy and nft
variants print it identically; tests/init/test_canonical.py applies every golden case to a real
namespace with both backends and checks this module against what the kernel reports.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from .rules import Rule
from .ruleargs import BASE_OPTIONS, Module, parse_rule_args

CTSTATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
FULL_MASK = 0xFFFFFFFF
Resolver = Callable[[str], str]  # user or group name -> numeric id text


def _address(value: str, family: int) -> str:
    """Masked network in inet_ntop's text: `10.1.2.3/8` -> `10.0.0.0/8`, `::127.0.0.53`."""
    net = ipaddress.ip_network(value, strict=False)
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(af, net.network_address.packed)}/{net.prefixlen}"


def _mark(value: str) -> str:
    """`1337` -> `0x539`; `1337/0xff` -> `0x539/0xff` (a full mask is not printed)."""
    mark, _, mask = value.partition("/")
    text = hex(int(mark, 0))
    if mask and int(mask, 0) != FULL_MASK:
        text += "/" + hex(int(mask, 0))
    return text


def _xmark(value: str) -> str:
    """MARK and TPROXY marks always print their mask."""
    mark, _, mask = value.partition("/")
    return f"{hex(int(mark, 0))}/{hex(int(mask, 0) if mask else FULL_MASK)}"


def _numeric(resolve: Resolver) -> Resolver:
    return lambda name: name if name.isdigit() else resolve(name)


def canonical(rule: Rule, family: int, user: Resolver, group: Resolver) -> str:
    """The rule as iptables-save prints it, without the leading `-A CHAIN `."""
    parsed = parse_rule_args(rule.args)
    parts = []
    for option in BASE_OPTIONS:
        if option in parsed.base:
            text, negated = parsed.base[option]
            if option in ("-s", "-d"):
                text = _address(text, family)
            parts.append(f"{'! ' if negated else ''}{option} {text}")
    for match in parsed.matches:
        parts.append(f"-m {match.name}")
        for name, value, negated in match.options:
            shown = _option(match.name, f"--{name}", value or "", user, group)
            parts.append(f"{'! ' if negated else ''}--{name} {shown}")
    if parsed.target is not None:
        parts += _target(parsed.target, family)
    return " ".join(parts)


def _option(match: str, option: str, value: str, user: Resolver, group: Resolver) -> str:
    if match == "owner":
        return _numeric(user)(value) if option == "--uid-owner" else _numeric(group)(value)
    if match in ("mark", "connmark") and option == "--mark":
        return _mark(value)
    if match == "conntrack" and option == "--ctstate":
        states = set(value.split(","))
        return ",".join(s for s in CTSTATE_ORDER if s in states)
    return value


def _target(target: Module, family: int) -> list[str]:
    options = {name: value for name, value, _ in target.options}
    flags = [f"--{name}" for name, value, _ in target.options if value is None]
    name = target.name
    if name == "REDIRECT":
        return ["-j", "REDIRECT", "--to-ports", options.get("to-ports") or options["to-port"] or ""]
    if name == "TPROXY":
        on_ip = options.get("on-ip") or ("0.0.0.0" if family == 4 else "::")
        return ["-j", "TPROXY", "--on-port", options["on-port"] or "", "--on-ip", on_ip,
                "--tproxy-mark", _xmark(options["tproxy-mark"] or "")]
    if name == "MARK" and options.get("set-mark"):
        return ["-j", "MARK", "--set-xmark", _xmark(options["set-mark"] or "")]
    if name == "CONNMARK" and flags:
        return ["-j", "CONNMARK", flags[0], "--nfmask", "0xffffffff", "--ctmask", "0xffffffff"]
    out = ["-j", name]
    for option, value, negated in target.options:
        out += (["!"] if negated else []) + [f"--{option}"] + ([value] if value is not None else [])
    return out
