"""The grammar of an iptables rule's arguments, parsed once for every consumer (the canonical
form in canonical.py, python-iptables rules in backends.py). Pure.

`! -d 10.0.0.0/8 -p tcp --dport 80 -m owner --uid-owner 1337 -j REDIRECT --to-ports 15001`
reads as the base fields (-s -d -i -o -p, each possibly negated), then the matches in order (a
`--dport`/`--sport` outside a tcp/udp match loads the protocol's match, as iptables does), then the
target and its options. Options are (name, value or None for a flag, negated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_OPTIONS = ("-s", "-d", "-i", "-o", "-p")
Option = tuple[str, str | None, bool]  # name without dashes, value, negated


@dataclass
class Module:
    """A match (`-m name`) or the target (`-j name`) with its options."""

    name: str
    options: list[Option] = field(default_factory=list)


@dataclass
class RuleArgs:
    base: dict[str, tuple[str, bool]] = field(default_factory=dict)  # option -> (value, negated)
    matches: list[Module] = field(default_factory=list)
    target: Module | None = None

    @property
    def protocol(self) -> str:
        return self.base.get("-p", ("", False))[0]


def parse_rule_args(args: tuple[str, ...] | list[str]) -> RuleArgs:
    """Parse a rule's arguments (without `-A CHAIN`)."""
    out = RuleArgs()
    module: Module | None = None
    negate = False
    i = 0
    while i < len(args):
        token = args[i]
        if token == "!":
            negate = True
            i += 1
            continue
        if token in BASE_OPTIONS:
            out.base[token] = (args[i + 1], negate)
            i += 2
        elif token in ("-m", "-j"):
            module = Module(args[i + 1])
            if token == "-m":
                out.matches.append(module)
            else:
                out.target = module
            i += 2
        else:
            if token in ("--dport", "--sport") and out.target is None and (
                module is None or module.name not in ("tcp", "udp")
            ):
                module = Module(out.protocol)
                out.matches.append(module)
            if module is None:
                raise ValueError(f"option {token} outside a match or target in {' '.join(args)!r}")
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            module.options.append((token[2:], args[i + 1] if has_value else None, negate))
            i += 2 if has_value else 1
        negate = False
    return out
