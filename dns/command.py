"""`pilotfish dns`: the DNS proxy on its own, fed from a NameTable file.

Flags win over Istio's environment variables (DNS_PROXY_ADDR, POD_NAMESPACE,
DNS_FORWARD_PARALLEL, DNS_FORWARD_TIMEOUT), which win over Istio's defaults. Every setting is
checked before a socket is bound; a bad one exits 2 naming the flag or variable and the value.
The table file is reloaded on SIGHUP and when it changes; a bad file is rejected with a log line
and the previous table keeps serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import trio
from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.limits import raise_open_files_limit
from pilotfish.common.watch import Signature, file_signature, watch_file
from prometheus_client import start_http_server

from .cache import DEFAULT_MAX_BYTES, MAX_CACHED_REPLY
from pilotfish.common.resolv import parse_resolv_conf
from pilotfish.common.settings import ConfigError, parse_bool, parse_duration, split_host_port

from .config import (
    ISTIO_RESOLV_CONF,
    RESOLV_CONF_MAX,
    DnsConfig,
    listen_addresses,
    parse_upstream,
    upstreams_from_resolv,
)
from .rebuild import Pacer, build_beside
from .server import DnsProxy
from .table import LookupTable, TableError
from .tablefile import TableFileError, table_entries

log = logging.getLogger("pilotfish.dns")

TABLE_POLL = 1.0  # seconds between checks of the table file
CACHE_MAX_BYTES_ENV = "PILOTFISH_DNS_CACHE_MAX_BYTES"


@dataclass(frozen=True)
class DnsCommand:
    """Everything `pilotfish dns` was asked to do, validated."""

    config: DnsConfig
    table_path: str
    metrics_addr: tuple[str, int] | None
    warnings: tuple[str, ...]


def add_parser(subparsers: argparse._SubParsersAction, name: str = "dns") -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        name,
        help="run the DNS proxy with a NameTable from a file",
        description="The sidecar DNS proxy (Istio's agent DNS on :15053), fed from a file.",
    )
    p.add_argument("--name-table", required=True, metavar="TABLE.json",
                   help="NameTable in protobuf JSON; reloaded on SIGHUP and on change")
    add_dns_arguments(p)
    p.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (/metrics, /stats/prometheus)")
    p.set_defaults(run=run)


def add_dns_arguments(p: argparse.ArgumentParser) -> None:
    """The DNS proxy's flags, shared by `pilotfish dns` and `pilotfish agent`."""
    p.add_argument("--resolv-conf", metavar="PATH",
                   help="nameservers and search list (default /etc/resolv.conf)")
    p.add_argument("--listen", action="append", metavar="ADDR",
                   help="host:port to serve DNS on (UDP and TCP), repeatable (default $DNS_PROXY_ADDR "
                        "or localhost:15053)")
    p.add_argument("--upstream", action="append", metavar="IP[:PORT]",
                   help="nameserver to forward to, repeatable (default: resolv.conf's, port 53)")
    p.add_argument("--proxy-namespace", metavar="NS", help="the pod's namespace (default $POD_NAMESPACE)")
    p.add_argument("--domain", metavar="D", help="proxy domain (default <NS>.svc.cluster.local)")
    p.add_argument("--forward-parallel", nargs="?", const="true", metavar="BOOL",
                   help="query all nameservers at once (default $DNS_FORWARD_PARALLEL or false)")
    p.add_argument("--forward-timeout", metavar="DURATION",
                   help="per-nameserver timeout, Go syntax (default $DNS_FORWARD_TIMEOUT or 5s)")
    p.add_argument("--cache-size", type=str, default="10000", metavar="N",
                   help="upstream answers to cache, 0 to turn the cache off (default 10000)")
    p.add_argument("--cache-max-ttl", default="5m", metavar="DURATION",
                   help="cap on a cached positive answer's TTL (default 5m)")
    p.add_argument("--cache-negative-ttl", default="30s", metavar="DURATION",
                   help="cap on a cached NXDOMAIN/NODATA's TTL (default 30s)")
    p.add_argument("--cache-stale", default="24h", metavar="DURATION",
                   help="how long past expiry an answer may be served when no upstream answers "
                        "(RFC 8767; default 24h, 0 turns it off)")
    p.add_argument("--cache-max-bytes", metavar="N",
                   help=f"bound of the upstream cache in bytes (default ${CACHE_MAX_BYTES_ENV} or "
                        f"{DEFAULT_MAX_BYTES}); replies over {MAX_CACHED_REPLY} bytes are never cached")


def resolve_command(args: argparse.Namespace, env: Mapping[str, str], is_root: bool) -> DnsCommand:
    """Flags and environment to a validated DnsCommand (reads resolv.conf, nothing else)."""
    config, warnings = dns_config(args, env, is_root)
    metrics = split_host_port(args.metrics_addr, "--metrics-addr") if args.metrics_addr else None
    return DnsCommand(config, args.name_table, metrics, tuple(warnings))


def dns_config(args: argparse.Namespace, env: Mapping[str, str], is_root: bool) -> tuple[DnsConfig, list[str]]:
    """The DNS flags (add_dns_arguments) and Istio's environment to a DnsConfig, plus warnings."""
    warnings: list[str] = []
    addrs = args.listen or [env.get("DNS_PROXY_ADDR", "")]
    addr_setting = "--listen" if args.listen else "DNS_PROXY_ADDR"
    on_53 = any(a.rstrip().endswith(":53") for a in addrs)
    resolv_path = args.resolv_conf
    if resolv_path is None:
        use_istio = is_root and on_53 and os.path.exists(ISTIO_RESOLV_CONF)
        resolv_path = ISTIO_RESOLV_CONF if use_istio else "/etc/resolv.conf"
    try:
        resolv = parse_resolv_conf(read_regular_file(resolv_path, RESOLV_CONF_MAX).decode("utf-8", "replace"))
    except UnreadableFile as err:
        raise ConfigError(f"--resolv-conf: cannot read {resolv_path}: {err}") from None
    if args.upstream:
        upstreams = tuple(parse_upstream(u, "--upstream") for u in args.upstream)
    else:
        upstreams = upstreams_from_resolv(resolv)
    listen: list[tuple[str, int]] = []
    before_table = False
    for addr in addrs:
        got, before, warning = listen_addresses(addr, tuple(h for h, _ in upstreams), is_root, addr_setting)
        listen += [a for a in got if a not in listen]
        before_table |= before
        if warning:
            warnings.append(warning)
    namespace = args.proxy_namespace if args.proxy_namespace is not None else env.get("POD_NAMESPACE", "")
    domain = args.domain if args.domain is not None else f"{namespace}.svc.cluster.local"
    if args.forward_parallel is not None:
        parallel = parse_bool(args.forward_parallel, "--forward-parallel")
    else:
        parallel = parse_bool(env.get("DNS_FORWARD_PARALLEL", "false") or "false", "DNS_FORWARD_PARALLEL")
    if args.forward_timeout is not None:
        timeout = parse_duration(args.forward_timeout, "--forward-timeout")
    else:
        timeout = parse_duration(env.get("DNS_FORWARD_TIMEOUT", "5s") or "5s", "DNS_FORWARD_TIMEOUT")
    if timeout <= 0:
        raise ConfigError(f"forward timeout must be positive, got {timeout}s")
    cache_size = _count_setting(args.cache_size, "--cache-size")
    if args.cache_max_bytes is not None:
        cache_max_bytes = _count_setting(args.cache_max_bytes, "--cache-max-bytes")
    else:
        env_bytes = env.get(CACHE_MAX_BYTES_ENV, "")
        cache_max_bytes = _count_setting(env_bytes, CACHE_MAX_BYTES_ENV) if env_bytes else DEFAULT_MAX_BYTES
    cache_times = {}
    for flag in ("cache_max_ttl", "cache_negative_ttl", "cache_stale"):
        name = "--" + flag.replace("_", "-")
        value = parse_duration(getattr(args, flag), name)
        if value < 0:
            raise ConfigError(f"{name}: must not be negative, got {getattr(args, flag)!r}")
        cache_times[flag] = value
    config = DnsConfig(
        listen=tuple(listen),
        upstreams=upstreams,
        search=resolv.search,
        proxy_namespace=namespace,
        proxy_domain=domain,
        forward_parallel=parallel,
        forward_timeout=timeout,
        forward_before_table=before_table,
        cache_size=cache_size,
        cache_max_ttl=cache_times["cache_max_ttl"],
        cache_negative_ttl=cache_times["cache_negative_ttl"],
        cache_stale=cache_times["cache_stale"],
        cache_max_bytes=cache_max_bytes,
    )
    return config, warnings


def _count_setting(text: str, setting: str) -> int:
    """A whole number of at least 0 (digits only: no sign, no unit)."""
    value = text.strip()
    if not value.isascii() or not value.isdigit():
        raise ConfigError(f"{setting}: want a whole number of 0 or more, got {text!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    """Entry point of `pilotfish dns`: validate, load, bind, serve until SIGTERM/SIGINT."""
    try:
        cmd = resolve_command(args, os.environ, os.geteuid() == 0)
        started = time.perf_counter()
        seen = file_signature(cmd.table_path)  # before the build: a change made meanwhile is seen
        lookup = _build(cmd.table_path, cmd.config, _no_pause)
    except (ConfigError, TableFileError, TableError) as err:
        log.error("dns: %s", err)
        return 2
    for warning in cmd.warnings:
        log.warning("dns: %s", warning)
    log.info("dns: open files limit %d", raise_open_files_limit())
    try:
        proxy = DnsProxy(cmd.config)
    except OSError as err:
        where = ", ".join(f"{h}:{p}" for h, p in cmd.config.listen)
        log.error("dns: cannot listen on %s: %s", where, err.strerror or err)
        return 1
    proxy.install(lookup, time.perf_counter() - started)
    cfg = cmd.config
    log.info(
        "dns: forwarding to %s (%s, timeout %gs), search %s, cache %s",
        ", ".join(f"{h}:{p}" for h, p in cfg.upstreams) or "no nameserver",
        "parallel" if cfg.forward_parallel else "serial", cfg.forward_timeout,
        " ".join(cfg.search) or "none",
        f"{cfg.cache_size} entries, {cfg.cache_max_bytes} bytes" if cfg.cache_size else "off",
    )
    metrics_server = None
    if cmd.metrics_addr:
        host, port = cmd.metrics_addr
        try:
            metrics_server, _ = start_http_server(port, host or "0.0.0.0", registry=proxy.registry)
        except OSError as err:
            proxy.close()
            log.error("dns: --metrics-addr %s:%d: %s", host, port, err.strerror or err)
            return 1
        log.info("dns: metrics on http://%s:%d/metrics", host, metrics_server.server_port)
    try:
        trio.run(_serve, proxy, cmd.table_path, seen)
    finally:
        if metrics_server is not None:  # its thread is a daemon: closing the socket is enough
            metrics_server.server_close()  # (shutdown() waits up to 0.5 s for its poll loop)
    log.info("dns: stopped")
    return 0


async def _serve(proxy: DnsProxy, table_path: str, seen: Signature | None) -> None:
    # SIGHUP is taken before the proxy says it listens: a reload asked for as soon as it is up
    # would otherwise meet SIGHUP's default action, which ends the process (seen in CI under load)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stops, \
            trio.open_signal_receiver(signal.SIGHUP) as hups:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            nursery.start_soon(_watch_table, proxy, table_path, seen, hups)
            async for signum in stops:
                log.info("dns: %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _watch_table(proxy: DnsProxy, path: str, seen: Signature | None, hups: AsyncIterator[int]) -> None:
    """Reload on SIGHUP, and when the file changes (common/watch.py; looked at every second)."""

    async def reload(why: str) -> None:
        # abandoned on shutdown: a build is paced and takes seconds for a large table (a
        # million services: ~20 s), it only ever ends in one reference assignment
        await trio.to_thread.run_sync(_reload, proxy, path, why, abandon_on_cancel=True)

    await watch_file(path, seen, TABLE_POLL, reload, hups)


def _build(path: str, config: DnsConfig, pause: Callable[[], None]) -> LookupTable:
    """The lookup table of a table file, read and built entry by entry, calling `pause` as it
    goes (dns/rebuild.py). A TableError names the file too."""
    try:
        return build_beside(
            table_entries(path), config.proxy_namespace, config.proxy_domain, config.search, pause
        )
    except TableError as err:
        raise TableError(f"{path}: {err}") from None


def _no_pause() -> None:
    """At start nothing is served yet: the build need not leave the GIL to anyone."""


def _reload(proxy: DnsProxy, path: str, why: str) -> None:
    """Load and build aside, then swap; a file or table that does not load is one ERROR line
    and the table in use keeps serving."""
    log.info("dns: reloading name table (%s)", why)
    started = time.perf_counter()
    try:
        lookup = _build(path, proxy.config, Pacer())
    except (TableFileError, TableError) as err:
        log.error("dns: rejected name table (%s): %s; still serving the previous table", why, err)
        return
    proxy.install(lookup, time.perf_counter() - started)
