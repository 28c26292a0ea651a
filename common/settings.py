"""Settings as Istio spells them, parsed the way its Go code parses them: durations
(time.ParseDuration), booleans (strconv.ParseBool), host:port (net.SplitHostPort). Every parser
raises ConfigError naming the setting and the bad value, so a command can exit before it touches
anything. Shared by `pilotfish dns`, `init` and `agent`."""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A setting has a bad value; the message names both."""


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str, setting: str) -> float:
    """Seconds from Go's time.ParseDuration syntax (`300ms`, `5s`, `1m30s`); `0` alone is 0."""
    value = text.strip()
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-")
    if body == "0":
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(body):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise ConfigError(f"{setting}: invalid duration {text!r} (Go syntax, e.g. 300ms, 5s)")
    return sign * total


def parse_bool(text: str, setting: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ConfigError(f"{setting}: invalid boolean {text!r} (true or false)")


def split_host_port(text: str, setting: str) -> tuple[str, int]:
    """Go's net.SplitHostPort plus a port range check: `host:port`, `[v6]:port`."""
    m = re.fullmatch(r"\[([^\]]*)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise ConfigError(f"{setting}: invalid address {text!r} (want host:port or [ipv6]:port)")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(f"{setting}: port out of range in {text!r}")
    return host, port
