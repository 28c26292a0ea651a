"""Configuration of `pilotfish init`: istio-iptables' flags and environment variables.

Same names, defaults, list syntax and precedence as istio-iptables (docs/istio-compat.md
"istio-iptables configuration"): built-in default < primary env var < extra env var < command-line flag. Flags are read the
way pflag reads them: `--name=value`, `--name value`, `-x value`, `-xvalue`, `-x=value`, and
booleans bare or as `--flag=true|false`.

Where istio-iptables accepts anything and fails later (or silently does something else), pilotfish
refuses up front with a message naming the setting and the value, before any rule is touched:
ports out of range, an unknown interception mode (Istio treats `tproxy` as REDIRECT), a TPROXY
mark or table that is not decimal (Istio fails after installing its rules), unparsable env values
(Istio ignores them silently).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NewType

from pilotfish.common.settings import ConfigError, parse_bool, parse_duration

__all__ = ["ConfigError", "Capture", "CaptureConfig", "Detected", "parse_args", "validate"]


@dataclass(frozen=True)
class CaptureConfig:
    """Everything istio-iptables reads, plus pilotfish's own switches, as the flags and variables
    say it (text). What the rules are made of is parsed from it once, into `capture`."""

    envoy_port: str = "15001"
    inbound_capture_port: str = "15006"
    inbound_tunnel_port: str = "15008"
    proxy_uid: str = ""
    proxy_gid: str = ""
    inbound_interception_mode: str = ""
    inbound_ports: str = ""
    local_exclude_ports: str = ""
    exclude_interfaces: str = ""
    service_cidr: str = ""
    service_exclude_cidr: str = ""
    outbound_ports: str = ""
    local_outbound_ports_exclude: str = ""
    kube_virt_interfaces: str = ""
    inbound_tproxy_mark: str = "1337"
    inbound_tproxy_route_table: str = "133"
    dry_run: bool = False
    iptables_probe_port: str = "15002"
    probe_timeout: float = 5.0
    skip_rule_apply: bool = False
    run_validation: bool = False
    redirect_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    capture_all_dns: bool = False
    network_namespace: str = ""
    cni_mode: bool = False
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    force_iptables_binary: str = ""
    # Environment-only settings (docs/istio-compat.md "istio-iptables configuration").
    owner_groups_include: str = "*"
    owner_groups_exclude: str = ""
    ipv4_loopback_cidr: str = "127.0.0.1/32"
    envoy_user: str = "istio-proxy"
    dry_run_file_path: str = ""
    # pilotfish's own.
    iptables_backend: str = "auto"
    resolv_conf: str = "/etc/resolv.conf"
    ipv6: str = "auto"
    log_level: str = "info"
    # (field, environment variable) for each value an environment variable set, so that an error
    # names the variable the user wrote rather than a flag they never passed.
    from_env: tuple[tuple[str, str], ...] = ()

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode == "TPROXY"

    @cached_property
    def capture(self) -> Capture:
        """The typed settings the rules are made of, parsed on first use and kept (validate()
        is that first use in a run); ConfigError names the setting of a bad value."""
        return parse_capture(self)


Cidr = ipaddress.IPv4Interface | ipaddress.IPv6Interface  # an address with its prefix, host bits kept
Interface = NewType("Interface", str)  # a name interface_problem() accepts


@dataclass(frozen=True)
class PortRange:
    """One item of a port list: a port (`first == last`) or `first:last`, 1-65535, first <= last."""

    first: int
    last: int


@dataclass(frozen=True)
class Capture:
    """The settings the rules are made of, in typed values: the planner reads these, never text.
    None stands for Istio's `*` (every port, every address, every group)."""

    envoy_port: int
    inbound_capture_port: int
    inbound_tunnel_port: int
    probe_port: int
    tproxy: bool
    # -b is set: Istio tests the text, so `-b ,` adds the inbound jump with no port to capture
    capture_inbound: bool
    inbound_ports: tuple[PortRange, ...] | None
    local_exclude_ports: tuple[PortRange, ...]
    outbound_ports: tuple[PortRange, ...]
    outbound_exclude_ports: tuple[PortRange, ...]
    tproxy_mark: int
    tproxy_route_table: int
    include_cidrs: tuple[Cidr, ...] | None
    exclude_cidrs: tuple[Cidr, ...]
    exclude_interfaces: tuple[Interface, ...]
    virtual_interfaces: tuple[Interface, ...]
    owner_groups_include: tuple[str, ...] | None
    owner_groups_exclude: tuple[str, ...]
    ipv4_loopback: ipaddress.IPv4Interface
    redirect_dns: bool
    capture_all_dns: bool
    drop_invalid: bool


@dataclass(frozen=True)
class Nameserver:
    """A DNS server to capture: its address, and its text as detection gave it, which the rules
    use as it is (Istio does; the golden `::127.0.0.53` would print as `::7f00:35`)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    text: str

    @property
    def version(self) -> int:
        return self.address.version


@dataclass(frozen=True)
class Detected:
    """What istio-iptables detects at run time (detect.py finds it, tests inject it), in the text
    detection yields; the properties give its typed values."""

    enable_ipv6: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    proxy_uid: str = "1337"  # resolved -u (ENVOY_USER's uid when -u is empty)
    proxy_gid: str = "1337"  # resolved -g (the uid string when -g is empty)

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(split_list(self.proxy_uid))

    @property
    def gids(self) -> tuple[str, ...]:
        return tuple(split_list(self.proxy_gid))

    @property
    def nameservers(self) -> tuple[Nameserver, ...]:
        """The DNS servers, IPv4 first."""
        return tuple(Nameserver(ipaddress.ip_address(s), s) for s in self.dns_servers_v4 + self.dns_servers_v6)


@dataclass(frozen=True)
class Flag:
    """One command-line flag: its field, names, environment variables and kind."""

    field: str
    long: str
    short: str = ""
    env: str | None = ""  # "" means the long name upper-cased with _; None means no env
    extra_env: str = ""
    kind: str = "str"  # str, bool, duration, port

    @property
    def env_name(self) -> str | None:
        if self.env is None:
            return None
        return self.env or self.long.upper().replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("envoy_port", "envoy-port", "p", env=None),
    Flag("inbound_capture_port", "inbound-capture-port", "z"),
    Flag("inbound_tunnel_port", "inbound-tunnel-port", "e"),
    Flag("proxy_uid", "proxy-uid", "u"),
    Flag("proxy_gid", "proxy-gid", "g"),
    Flag("inbound_interception_mode", "istio-inbound-interception-mode", "m"),
    Flag("inbound_ports", "istio-inbound-ports", "b"),
    Flag("local_exclude_ports", "istio-local-exclude-ports", "d"),
    Flag("exclude_interfaces", "istio-exclude-interfaces", "c"),
    Flag("service_cidr", "istio-service-cidr", "i"),
    Flag("service_exclude_cidr", "istio-service-exclude-cidr", "x"),
    Flag("outbound_ports", "istio-outbound-ports", "q"),
    Flag("local_outbound_ports_exclude", "istio-local-outbound-ports-exclude", "o"),
    Flag("kube_virt_interfaces", "kube-virt-interfaces", "k"),
    Flag("inbound_tproxy_mark", "istio-inbound-tproxy-mark", "t"),
    Flag("inbound_tproxy_route_table", "istio-inbound-tproxy-route-table", "r"),
    Flag("dry_run", "dry-run", "n", kind="bool"),
    Flag("iptables_probe_port", "iptables-probe-port", kind="port"),
    Flag("probe_timeout", "probe-timeout", kind="duration"),
    Flag("skip_rule_apply", "skip-rule-apply", kind="bool"),
    Flag("run_validation", "run-validation", kind="bool"),
    Flag("redirect_dns", "redirect-dns", extra_env="ISTIO_META_DNS_CAPTURE", kind="bool"),
    Flag("drop_invalid", "drop-invalid", extra_env="INVALID_DROP", kind="bool"),
    Flag("dual_stack", "dual-stack", extra_env="ISTIO_DUAL_STACK", kind="bool"),
    Flag("capture_all_dns", "capture-all-dns", kind="bool"),
    Flag("network_namespace", "network-namespace"),
    Flag("cni_mode", "cni-mode", kind="bool"),
    Flag("reconcile", "reconcile", kind="bool"),
    Flag("cleanup_only", "cleanup-only", kind="bool"),
    Flag("force_apply", "force-apply", kind="bool"),
    Flag("native_nftables", "native-nftables", kind="bool"),
    Flag("force_iptables_binary", "force-iptables-binary"),
    Flag("iptables_backend", "iptables-backend", env=None),
    Flag("resolv_conf", "resolv-conf", env=None),
    Flag("ipv6", "ipv6", env=None),
    Flag("log_level", "log_output_level", env=None),
)
# Istio's root-command logging flags: accepted so the injection template's arguments work.
IGNORED_FLAGS = ("log_as_json", "log_target", "log_caller", "log_stacktrace_level", "log_rotate")
ENV_ONLY = {
    "owner_groups_include": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "owner_groups_exclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "ipv4_loopback_cidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
    "envoy_user": "ENVOY_USER",
    "dry_run_file_path": "DRY_RUN_FILE_PATH",
}
_BY_LONG = {f.long: f for f in FLAGS}
_BY_SHORT = {f.short: f for f in FLAGS if f.short}
IFNAMSIZ = 16  # the kernel's buffer for an interface name, NUL included: at most 15 bytes
# Characters the kernel refuses in a name ('/', ':', whitespace) or a backend reinterprets:
# iptables-restore strips quotes and takes backslash escapes, so `a"b` would become `ab`.
_NOT_IN_INTERFACE = frozenset("/:\"'`\\")


def split_list(value: str) -> list[str]:
    """Istio's list syntax: split on ',', drop empty items, no trimming."""
    return [item for item in value.split(",") if item]


def _convert(flag: Flag, setting: str, raw: str) -> object:
    if flag.kind == "bool":
        return parse_bool(raw, setting)
    if flag.kind == "duration":
        return parse_duration(raw, setting)
    if flag.kind == "port":
        _check_port(raw, setting)
    return raw


def parse_args(argv: Sequence[str], env: Mapping[str, str]) -> tuple[CaptureConfig, list[str]]:
    """Flags and environment to a config; returns it and the positional words (e.g. `clean`).

    Raises ConfigError naming the flag or variable and the value.
    """
    values: dict[str, object] = {}
    from_env: dict[str, str] = {}
    for known in FLAGS:
        for name in (known.env_name, known.extra_env):
            if name and name in env:
                values[known.field] = _convert(known, name, env[name])
                from_env[known.field] = name
    for field_name, name in ENV_ONLY.items():
        if name in env:
            values[field_name] = env[name]
    positional: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            positional += args[i:]
            break
        if not token.startswith("-") or token == "-":
            positional.append(token)
            continue
        flag: Flag | None
        if token.startswith("--"):
            name, equals, value = token[2:].partition("=")
            has_value = bool(equals)
            flag = _BY_LONG.get(name) or _BY_LONG.get(name.replace("_", "-"))
            if flag is None and name in IGNORED_FLAGS:
                if not has_value and i < len(args) and not args[i].startswith("-"):
                    i += 1
                continue
            shown = "--" + name
        else:
            name, value = token[1], token[2:]
            has_value = bool(value)
            if value.startswith("="):
                value = value[1:]
            flag = _BY_SHORT.get(name)
            shown = "-" + name
        if flag is None:
            raise ConfigError(f"unknown flag {shown}")
        if not has_value:
            if flag.kind == "bool":
                value = "true"
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise ConfigError(f"flag {shown} needs a value")
        values[flag.field] = _convert(flag, shown, value)
        from_env.pop(flag.field, None)
    values["from_env"] = tuple(from_env.items())
    return replace(CaptureConfig(), **values), positional  # type: ignore[arg-type]


def _check_port(port: str, setting: str, allow_range: bool = False) -> PortRange:
    parts = port.split(":") if allow_range else [port]
    if len(parts) > 2 or not all(p.isdigit() and 0 < int(p) <= 65535 for p in parts):
        kind = "port or range (1-65535)" if allow_range else "port (1-65535)"
        raise ConfigError(f"{setting}: invalid {kind}: {port!r}")
    first, last = int(parts[0]), int(parts[-1])
    if first > last:
        raise ConfigError(f"{setting}: reversed port range {port!r} (want first:last, first <= last)")
    return PortRange(first, last)


def _port(config: CaptureConfig, name: str) -> int:
    return _check_port(getattr(config, name), setting(config, name)).first


def _ports(config: CaptureConfig, name: str) -> tuple[PortRange, ...]:
    return tuple(_check_port(p, setting(config, name), allow_range=True) for p in split_list(getattr(config, name)))


def interface_problem(name: str) -> str | None:
    """What makes `name` unusable as an interface name in a rule, or None. The kernel's rules
    (dev_valid_name: 1-15 bytes, not '.' or '..', no '/', ':' or whitespace), plus what iptables
    reads as syntax: a leading '!' negates the match, a trailing '+' is a wildcard (so '+' is
    allowed only there, after at least one character), quotes and backslashes are consumed by
    iptables-restore's parser. Only printable ASCII is accepted: the kernel takes any other byte,
    but python-iptables sizes a name in characters, so `ethé` (5 characters, 6 bytes) would be
    installed as the wildcard `ethé+`."""
    base = name.removesuffix("+")
    size = len(name.encode())
    if not base:
        return "no name before the '+' wildcard"
    if size >= IFNAMSIZ:
        return f"{size} bytes long, the kernel allows at most {IFNAMSIZ - 1}"
    if base in (".", ".."):
        return "'.' and '..' are not interface names"
    if name.startswith("!"):
        return "a leading '!' would negate the match instead of naming an interface"
    if "+" in base:
        return "'+' is only allowed at the end, as the iptables wildcard"
    for char in base:
        if char in _NOT_IN_INTERFACE or char.isspace() or not (char.isascii() and char.isprintable()):
            return f"the character {char!r} is not allowed"
    return None


def parse_cidrs(value: str, setting: str) -> list[Cidr] | None:
    """A CIDR list (`-i`, `-x`); None for the wildcard `*`. Like Go's netip.ParsePrefix the
    address keeps its host bits; IPv4-mapped IPv6 prefixes count as IPv6."""
    if value == "*":
        return None
    out: list[Cidr] = []
    for item in split_list(value):
        try:
            if "/" not in item:
                raise ValueError
            out.append(ipaddress.ip_interface(item))
        except ValueError:
            raise ConfigError(f"{setting}: invalid CIDR {item!r} (want address/bits)") from None
    return out


def cidr_text(cidr: Cidr) -> str:
    """Go netip's text of a prefix, host bits kept: lower case, RFC 5952, and an IPv4-mapped
    address in dotted form (Python would print ::ffff:102:304)."""
    mapped = getattr(cidr.ip, "ipv4_mapped", None)
    address = f"::ffff:{mapped}" if mapped is not None else str(cidr.ip)
    return f"{address}/{cidr.network.prefixlen}"


def parse_capture(config: CaptureConfig) -> Capture:
    """The settings the rules are made of, parsed and checked (ConfigError on the first fault,
    naming the setting); `config.capture` keeps the result."""
    envoy, inbound, tunnel, probe = (_port(config, name) for name in (
        "envoy_port", "inbound_capture_port", "inbound_tunnel_port", "iptables_probe_port"))
    inbound_ports = None if config.inbound_ports == "*" else _ports(config, "inbound_ports")
    exclude_ports, outbound_ports, outbound_exclude = (_ports(config, name) for name in (
        "local_exclude_ports", "outbound_ports", "local_outbound_ports_exclude"))
    if config.inbound_interception_mode not in ("", "REDIRECT", "TPROXY"):
        hint = " (TPROXY is case-sensitive; istio-iptables would silently use REDIRECT)" if (
            config.inbound_interception_mode.upper() == "TPROXY") else ""
        raise ConfigError(
            f"{setting(config, 'inbound_interception_mode')}: unknown mode "
            f"{config.inbound_interception_mode!r}, want REDIRECT or TPROXY{hint}"
        )
    mark, route_table = (_number(config, name) for name in ("inbound_tproxy_mark", "inbound_tproxy_route_table"))
    if config.service_exclude_cidr == "*":
        raise ConfigError(f"{setting(config, 'service_exclude_cidr')}: '*' is not allowed")
    include = parse_cidrs(config.service_cidr, setting(config, "service_cidr"))
    exclude = parse_cidrs(config.service_exclude_cidr, setting(config, "service_exclude_cidr")) or []
    # the settings that name interfaces (-i is a CIDR list; the planner's own "lo" is fixed)
    excluded_interfaces, virtual_interfaces = (_interfaces(config, name) for name in (
        "exclude_interfaces", "kube_virt_interfaces"))
    for name in ("proxy_uid", "proxy_gid"):
        for item in split_list(getattr(config, name)):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", item):
                raise ConfigError(f"{setting(config, name)}: invalid user or group {item!r}")
    groups = None if config.owner_groups_include == "*" else tuple(split_list(config.owner_groups_include))
    if groups is not None and len(groups) > 64:
        raise ConfigError(f"ISTIO_OUTBOUND_OWNER_GROUPS: at most 64 groups, got {len(groups)}")
    return Capture(
        envoy_port=envoy, inbound_capture_port=inbound, inbound_tunnel_port=tunnel, probe_port=probe,
        tproxy=config.tproxy, capture_inbound=bool(config.inbound_ports), inbound_ports=inbound_ports,
        local_exclude_ports=exclude_ports, outbound_ports=outbound_ports, outbound_exclude_ports=outbound_exclude,
        tproxy_mark=mark, tproxy_route_table=route_table,
        include_cidrs=None if include is None else tuple(include), exclude_cidrs=tuple(exclude),
        exclude_interfaces=excluded_interfaces, virtual_interfaces=virtual_interfaces,
        owner_groups_include=groups, owner_groups_exclude=tuple(split_list(config.owner_groups_exclude)),
        ipv4_loopback=_loopback_cidr(config.ipv4_loopback_cidr),
        redirect_dns=config.redirect_dns, capture_all_dns=config.capture_all_dns, drop_invalid=config.drop_invalid,
    )


def _number(config: CaptureConfig, name: str) -> int:
    """A TPROXY mark or route table: decimal (Istio passes it on as text, and iptables and ip would
    read `0x539` as hex, `01337` as octal), 1 to 2^32-1."""
    value = getattr(config, name)
    if not value.isdigit() or not 0 < int(value) < 2**32:
        raise ConfigError(f"{setting(config, name)}: want a decimal number, got {value!r}")
    return int(value)


def _interfaces(config: CaptureConfig, name: str) -> tuple[Interface, ...]:
    out = []
    for iface in split_list(getattr(config, name)):
        problem = interface_problem(iface)
        if problem:
            raise ConfigError(f"{setting(config, name)}: invalid interface name {iface!r}: {problem}")
        out.append(Interface(iface))
    return tuple(out)


def validate(config: CaptureConfig) -> Capture:
    """Every check that can be made without touching the system; ConfigError on the first fault.
    Returns the typed settings (parsed once, kept as `config.capture`)."""
    capture = config.capture
    if config.force_iptables_binary not in ("", "legacy", "nft"):
        raise ConfigError(f"--force-iptables-binary: want legacy or nft, got {config.force_iptables_binary!r}")
    if config.iptables_backend not in ("auto", "legacy", "nft"):
        raise ConfigError(f"--iptables-backend: want legacy, nft or auto, got {config.iptables_backend!r}")
    if config.ipv6 not in ("auto", "on", "off"):
        raise ConfigError(f"--ipv6: want auto, on or off, got {config.ipv6!r}")
    if config.native_nftables:
        raise ConfigError("--native-nftables: native nftables is not supported yet; use the nft backend of iptables")
    if config.cleanup_only and config.reconcile:
        raise ConfigError("--cleanup-only and --reconcile cannot be combined")
    if config.cleanup_only and config.skip_rule_apply:
        raise ConfigError("--cleanup-only and --skip-rule-apply cannot be combined")
    if config.probe_timeout <= 0:
        raise ConfigError(f"--probe-timeout: must be positive, got {config.probe_timeout}s")
    return capture


def _loopback_cidr(value: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        iface = None
    if (
        not isinstance(iface, ipaddress.IPv4Interface)
        or "/" not in value
        or not iface.ip.is_loopback
        or not 8 <= iface.network.prefixlen <= 32
    ):
        raise ConfigError(
            f"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: want an IPv4 loopback CIDR with a prefix of 8-32, "
            f"got {value!r}"
        )
    return iface


def setting(config: CaptureConfig, field_name: str) -> str:
    """How to name a setting in a message: the environment variable that set it, else its short
    and long flag."""
    env = dict(config.from_env).get(field_name)
    if env:
        return env
    flag = next(f for f in FLAGS if f.field == field_name)
    return f"-{flag.short}/--{flag.long}" if flag.short else f"--{flag.long}"


def effective_backend(config: CaptureConfig) -> str:
    """`--iptables-backend`, or Istio's FORCE_IPTABLES_BINARY when that is set."""
    if config.iptables_backend != "auto":
        return config.iptables_backend
    return config.force_iptables_binary or "auto"

