"""`pilotfish init`: istio-iptables' command line, applied atomically and idempotently.

    pilotfish init [istio-iptables flags] [--iptables-backend legacy|nft|auto]
                   [--resolv-conf PATH] [--ipv6 auto|on|off]
    pilotfish init clean [same flags]          (= --cleanup-only)

Exit codes: 0 done (or nothing to do), 1 bad input or a failed apply (rolled back), 126 the
validation probe was not redirected.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from pilotfish.common.atomic import write_atomic

from .apply import ApplyError, Result, run_tables
from .backends import Backend, BackendError, choose
from .canonical import canonical
from .config import CaptureConfig, ConfigError, Detected, effective_backend, parse_args, validate
from .detect import check_names, detect, group_id, host_is_ipv6, user_id
from .nslock import LockError, namespace_lock
from .planner import Plan, plan
from .restore import dry_run_text
from .rules import Rule
from .routespec import (
    PASSTHROUGH_V6,
    RouteSpec,
    add_passthrough_address,
    remove_passthrough_address,
)
from .validation import EXIT_VALIDATION_FAILED, FAILURE_MESSAGE, validate_capture

log = logging.getLogger("pilotfish.init")

USAGE = __doc__.split("\n\n")[1]


def log_level(config: CaptureConfig) -> str:
    """Istio's `--log_output_level=default:debug` (or a bare level) as a Python level name."""
    for part in config.log_level.split(","):
        scope, _, level = part.rpartition(":")
        if scope in ("", "default"):
            return {"warn": "warning", "none": "critical", "fatal": "critical"}.get(level, level)
    return "info"


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    from pilotfish.common.logs import setup_logging

    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        config, positional = parse_args(argv, env)
        setup_logging(log_level(config) if log_level(config) in ("debug", "info", "warning", "error", "critical") else "info")
        if positional == ["clean"]:
            config = replace(config, cleanup_only=True)
        elif positional:
            raise ConfigError(f"unexpected argument {positional[0]!r} (only 'clean' is a subcommand)")
        validate(config)
        detected = detect(config)
    except ConfigError as err:
        setup_logging("info")
        log.error("init: %s", err)
        return 1
    the_plan = plan(config, detected)
    if config.dry_run:
        text = dry_run_text(the_plan)
        sys.stdout.write(text)
        if config.dry_run_file_path:
            write_atomic(config.dry_run_file_path, text.encode(), 0o644)
        return 0
    if not config.skip_rule_apply:
        code = _apply(config, the_plan, detected)
        if code:
            return code
    if config.run_validation:
        ipv6 = detected.enable_ipv6 and host_is_ipv6()
        if not validate_capture(config, ipv6):
            log.error("init: %s", FAILURE_MESSAGE)
            return EXIT_VALIDATION_FAILED
    return 0


def _canon(rule: Rule, family: int) -> str:
    return canonical(rule, family, user_id, group_id)


def _apply(config: CaptureConfig, the_plan: Plan, detected: Detected) -> int:
    capture = config.capture
    spec = RouteSpec(
        mark=capture.tproxy_mark,
        table=capture.tproxy_route_table,
        families=the_plan.families,
        tproxy=capture.tproxy and capture.capture_inbound,
        passthrough_v6=6 in the_plan.families,
    )
    try:
        check_names(config, detected)
        # From the first read of the tables to the last write: another run deciding from the same
        # tables meanwhile would undo this one (nslock.py).
        with namespace_lock() as lock:
            log.debug("init: holding %s", lock)
            backend, reason = choose(effective_backend(config), the_plan.families)
            log.info("init: iptables backend %s: %s", backend.name, reason)
            result = _change(config, the_plan, spec, backend)
    except (ConfigError, LockError, ApplyError, BackendError, OSError) as err:
        log.error("init: %s", err)
        return 1
    what = "removed" if config.cleanup_only else "installed"
    if not result.changed:
        log.info("init: nothing to do: the rules are %s already", "absent" if config.cleanup_only else "in place")
    else:
        log.info("init: rules %s (%d changes)", what, len(result.diff))
        for line in result.diff:
            log.debug("init: %s", line)
    return 0


def _change(config: CaptureConfig, the_plan: Plan, spec: RouteSpec, backend: Backend) -> Result:
    if not config.cleanup_only:
        return run_tables(
            backend, the_plan, _canon, replace=config.reconcile or config.force_apply,
            before=None if spec.satisfied() else lambda: _install_routes(spec),
        )
    result = run_tables(backend, the_plan, _canon, cleanup=True)
    if spec.tproxy:
        from . import routes  # pyroute2 costs ~0.1 s to import: only when needed

        routes.remove(spec)
    if spec.passthrough_v6:
        remove_passthrough_address()
    return result


def _install_routes(spec: RouteSpec) -> Callable[[], None]:
    """Before the tables: ::6 on lo for IPv6, the policy routing for TPROXY, each only where
    missing. Neither does anything without the rules, and both can be taken back exactly (a legacy
    table, once created, cannot), so a failure here leaves the namespace as it was. Returns how
    to remove what it added, for when a table fails after it."""
    added = spec.passthrough_v6 and add_passthrough_address()
    if added:
        log.info("init: added %s/128 to lo", PASSTHROUGH_V6)
    added_routes: list[tuple[str, int]] = []
    if spec.tproxy:
        from . import routes  # pyroute2 costs ~0.1 s to import: only when needed

        try:
            added_routes = routes.install(spec)
        except OSError:
            if added:
                remove_passthrough_address()
            raise

    def undo() -> None:
        left: list[str] = []
        if added_routes:
            from . import routes

            try:
                routes.undo(spec, added_routes)
            except OSError as err:
                left.append(str(err))
        if added:
            try:
                remove_passthrough_address()
            except OSError as err:
                left.append(f"could not remove {PASSTHROUGH_V6}/128 from lo: {err}")
        if left:
            raise OSError("; ".join(left))

    return undo

