"""resolv.conf as Istio reads it (miekg's ClientConfigFromReader): the nameservers the DNS
proxy forwards to and `pilotfish init` captures, and the search list."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResolvConf:
    """The parts of resolv.conf Istio uses (miekg's ClientConfigFromReader)."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = field(default_factory=tuple)


def parse_resolv_conf(text: str) -> ResolvConf:
    """Nameservers in order, as written; `search` replaces the list, `domain X` makes it [X]."""
    servers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0][0] in "#;":
            continue
        if words[0] == "nameserver" and len(words) > 1:
            servers.append(words[1])
        elif words[0] == "search":
            search = words[1:]
        elif words[0] == "domain" and len(words) > 1:
            search = [words[1]]
    return ResolvConf(tuple(servers), tuple(search))
