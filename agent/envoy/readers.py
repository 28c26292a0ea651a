"""ProxyConfig fields and environment variables as the Envoy settings read them: each checked,
a bad value a ConfigError naming the field or variable and the value."""

from __future__ import annotations

from collections.abc import Mapping

from pilotfish.common.settings import ConfigError, parse_bool, parse_duration


def pc_int(pc: Mapping[str, object], name: str, default: int, low: int, high: int) -> int:
    value = pc.get(name, default)
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"ProxyConfig {name}: want a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"ProxyConfig {name}: want {low}-{high}, got {number}")
    return number


def pc_duration(pc: Mapping[str, object], name: str, default: str) -> float:
    value = pc.get(name, default)
    seconds = parse_duration(str(value), f"ProxyConfig {name}")
    if seconds < 0:
        raise ConfigError(f"ProxyConfig {name}: negative duration {value!r}")
    return seconds


def pc_bool(pc: Mapping[str, object], name: str, default: bool) -> bool:
    """A boolean field: true or false in YAML/JSON, or Go's words for one in a string."""
    value = pc.get(name)
    if value is None:
        return default
    return value if isinstance(value, bool) else parse_bool(str(value), f"ProxyConfig {name}")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "")
    return parse_bool(value, name) if value else default


def env_int(env: Mapping[str, str], name: str, default: int, low: int, high: int, what: str) -> int:
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: want {what}, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: want {low}-{high}, got {value}")
    return value
