"""TPROXY policy routing and the IPv6 inbound-passthrough address (reference §7.3), through
netlink (pyroute2). Installing is idempotent (istio-iptables' exclusive `ip rule add` fails on a
rerun) and cleanup removes what was installed (istio-iptables leaves it behind)."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .planner import V4
from .routespec import PASSTHROUGH_V6, RouteSpec

log = logging.getLogger("pilotfish.init")


def _af(family: int) -> int:
    return socket.AF_INET if family == V4 else socket.AF_INET6


def _has_rule(ipr: IPRoute, family: int, mark: int, table: int) -> bool:
    return any(
        r.get_attr("FRA_FWMARK") == mark and (r.get_attr("FRA_TABLE") or r.get("table")) == table
        for r in ipr.get_rules(family=_af(family))
    )


def install(spec: RouteSpec) -> Callable[[], None]:
    """Install what is missing; return an undo for exactly what this call added."""
    undo: list[Callable[[IPRoute], None]] = []
    with IPRoute() as ipr:
        try:
            lo = ipr.link_lookup(ifname="lo")[0]
            if spec.passthrough_v6 and not _has_address(ipr, lo):
                ipr.addr("add", index=lo, address=PASSTHROUGH_V6, prefixlen=128)
                undo.append(lambda i: _ignore_missing(i.addr, "del", index=lo, address=PASSTHROUGH_V6, prefixlen=128))
            if spec.tproxy:
                for family in spec.families:
                    if not _has_rule(ipr, family, spec.mark, spec.table):
                        ipr.rule("add", family=_af(family), fwmark=spec.mark, table=spec.table)
                        undo.append(lambda i, f=family: _delete_rules(i, f, spec.mark, spec.table))
                    dst = "0.0.0.0/0" if family == V4 else "::/0"
                    if not _has_local_default(ipr, family, spec.table):
                        ipr.route("add", family=_af(family), dst=dst, type="local", oif=lo, table=spec.table,
                                  scope="host")
                        undo.append(lambda i, f=family, d=dst: _ignore_missing(
                            i.route, "del", family=_af(f), dst=d, type="local", oif=lo, table=spec.table, scope="host"))
        except NetlinkError as err:
            _run_undo(ipr, undo)
            raise OSError(err.code, f"setting up TPROXY routing: {err}") from None
    return lambda: _with_ipr(lambda ipr: _run_undo(ipr, undo))


def remove(spec: RouteSpec) -> None:
    """Remove the fwmark rules, the local default routes and the ::6 address, where present."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if spec.tproxy:
            for family in spec.families:
                _delete_rules(ipr, family, spec.mark, spec.table)
                dst = "0.0.0.0/0" if family == V4 else "::/0"
                # The scope must be given: an IPv4 delete without it matches nothing (ESRCH).
                _ignore_missing(ipr.route, "del", family=_af(family), dst=dst, type="local", oif=lo,
                                table=spec.table, scope="host")
        if spec.passthrough_v6:
            _ignore_missing(ipr.addr, "del", index=lo, address=PASSTHROUGH_V6, prefixlen=128)


def _has_address(ipr: IPRoute, lo: int) -> bool:
    return any(a.get_attr("IFA_ADDRESS") == PASSTHROUGH_V6 for a in ipr.get_addr(family=socket.AF_INET6, index=lo))


def _has_local_default(ipr: IPRoute, family: int, table: int) -> bool:
    return any(r.get("type") == 2 and r.get("dst_len") == 0 for r in ipr.get_routes(family=_af(family), table=table))


def _delete_rules(ipr: IPRoute, family: int, mark: int, table: int) -> None:
    while _has_rule(ipr, family, mark, table):
        ipr.rule("del", family=_af(family), fwmark=mark, table=table)


def _ignore_missing(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as err:
        if err.code not in (errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL):
            raise


def _run_undo(ipr: IPRoute, undo: list[Callable[[IPRoute], None]]) -> None:
    for action in reversed(undo):
        try:
            action(ipr)
        except NetlinkError as err:
            log.error("init: could not undo a routing change: %s", err)


def _with_ipr(action: Callable[[IPRoute], None]) -> None:
    with IPRoute() as ipr:
        action(ipr)
