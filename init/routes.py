"""TPROXY policy routing (docs/istio-compat.md "istio-iptables rules") through netlink (pyroute2). Installing is idempotent
(istio-iptables' exclusive `ip rule add` fails on a rerun) and cleanup removes what was installed
(istio-iptables leaves it behind). The ::6 address is in routespec.py."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .rules import V4
from .routespec import RouteSpec

log = logging.getLogger("pilotfish.init")
Item = tuple[str, int]  # ("rule" | "route", family)


def _af(family: int) -> int:
    return socket.AF_INET if family == V4 else socket.AF_INET6


def _default(family: int) -> str:
    return "0.0.0.0/0" if family == V4 else "::/0"


def everything(spec: RouteSpec) -> list[Item]:
    """All a TPROXY configuration installs, in installation order."""
    items: list[Item] = []
    if spec.tproxy:
        for family in spec.families:
            items += [("rule", family), ("route", family)]
    return items


def install(spec: RouteSpec) -> list[Item]:
    """Install what is missing and return what was added. If netlink refuses something, what
    this call added is removed again and OSError is raised."""
    added: list[Item] = []
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            for item in everything(spec):
                if not _present(ipr, lo, spec, item):
                    _add(ipr, lo, spec, item)
                    added.append(item)
                    log.info("init: added the TPROXY %s (ipv%d, mark %d, table %d)", *item, spec.mark, spec.table)
        except NetlinkError as err:
            try:
                _remove(ipr, lo, spec, added)
            except OSError as left:
                raise OSError(err.code, f"setting up TPROXY routing: {err}; {left}") from None
            raise OSError(err.code, f"setting up TPROXY routing: {err}") from None
    return added


def undo(spec: RouteSpec, added: list[Item]) -> None:
    """Remove what install() returned it had added (the rest was there before)."""
    with IPRoute() as ipr:
        _remove(ipr, ipr.link_lookup(ifname="lo")[0], spec, added)


def remove(spec: RouteSpec) -> None:
    """Remove the fwmark rules, the local default routes and ::6, where present."""
    with IPRoute() as ipr:
        _remove(ipr, ipr.link_lookup(ifname="lo")[0], spec, everything(spec))


def _present(ipr: IPRoute, lo: int, spec: RouteSpec, item: Item) -> bool:
    kind, family = item
    if kind == "rule":
        return _has_rule(ipr, family, spec.mark, spec.table)
    return any(r.get("type") == 2 and r.get("dst_len") == 0 for r in ipr.get_routes(family=_af(family), table=spec.table))


def _add(ipr: IPRoute, lo: int, spec: RouteSpec, item: Item) -> None:
    kind, family = item
    if kind == "rule":
        ipr.rule("add", family=_af(family), fwmark=spec.mark, table=spec.table)
    else:
        ipr.route("add", family=_af(family), dst=_default(family), type="local", oif=lo, table=spec.table,
                  scope="host")


def _remove(ipr: IPRoute, lo: int, spec: RouteSpec, items: list[Item]) -> None:
    """Remove `items`, going on past a failure; OSError naming what remains if any failed (a
    rollback must not say the namespace is as it was while a rule is left in it)."""
    left: list[str] = []
    for kind, family in reversed(items):
        try:
            if kind == "rule":
                while _has_rule(ipr, family, spec.mark, spec.table):
                    ipr.rule("del", family=_af(family), fwmark=spec.mark, table=spec.table)
            else:  # the scope must be given: an IPv4 delete without it matches nothing (ESRCH)
                _ignore_missing(ipr.route, "del", family=_af(family), dst=_default(family), type="local", oif=lo,
                                table=spec.table, scope="host")
        except NetlinkError as err:
            left.append(f"the TPROXY {kind} (ipv{family}, mark {spec.mark}, table {spec.table}): {err}")
    if left:
        raise OSError("could not remove " + "; ".join(left))


def _has_rule(ipr: IPRoute, family: int, mark: int, table: int) -> bool:
    return any(
        r.get_attr("FRA_FWMARK") == mark and (r.get_attr("FRA_TABLE") or r.get("table")) == table
        for r in ipr.get_rules(family=_af(family))
    )


def _ignore_missing(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as err:
        if err.code not in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL):
            raise
