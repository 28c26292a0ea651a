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

from .planner import Rule

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
    args = rule.args
    base: dict[str, str] = {}
    matches: list[tuple[str, list[str]]] = []
    target: list[str] = []
    proto = ""
    negate = False
    i = 0
    while i < len(args):
        token = args[i]
        if token == "!":
            negate = True
            i += 1
            continue
        bang = "! " if negate else ""
        negate = False
        if token in ("-s", "-d", "-i", "-o", "-p"):
            value = args[i + 1]
            if token in ("-s", "-d"):
                value = _address(value, family)
            if token == "-p":
                proto = value
            base[token] = f"{bang}{token} {value}"
            i += 2
        elif token == "-m":
            matches.append((args[i + 1], []))
            i += 2
        elif token == "-j":
            target = _target(args[i + 1 :], family)
            break
        else:
            if token in ("--dport", "--sport") and (not matches or matches[-1][0] not in ("tcp", "udp")):
                matches.append((proto, []))  # iptables loads the protocol's match implicitly
            name, options = matches[-1]
            value = args[i + 1]
            options.append(f"{bang}{token} {_option(name, token, value, user, group)}")
            i += 2
    parts = [base[k] for k in ("-s", "-d", "-i", "-o", "-p") if k in base]
    for name, options in matches:
        parts.append(f"-m {name}")
        parts += options
    parts += target
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


def _target(tokens: tuple[str, ...], family: int) -> list[str]:
    name, options = tokens[0], dict(zip(tokens[1::2], tokens[2::2]))
    flags = [t for t in tokens[1:] if t in ("--save-mark", "--restore-mark")]
    if name == "REDIRECT":
        return ["-j", "REDIRECT", "--to-ports", options.get("--to-ports") or options["--to-port"]]
    if name == "TPROXY":
        on_ip = options.get("--on-ip", "0.0.0.0" if family == 4 else "::")
        return ["-j", "TPROXY", "--on-port", options["--on-port"], "--on-ip", on_ip,
                "--tproxy-mark", _xmark(options["--tproxy-mark"])]
    if name == "MARK" and "--set-mark" in options:
        return ["-j", "MARK", "--set-xmark", _xmark(options["--set-mark"])]
    if name == "CONNMARK" and flags:
        return ["-j", "CONNMARK", flags[0], "--nfmask", "0xffffffff", "--ctmask", "0xffffffff"]
    return ["-j", *tokens]
