"""Istio's capture test cases (data/NAME.json + NAME.golden) as pilotfish inputs."""

from __future__ import annotations

import json
from pathlib import Path

from pilotfish.init.config import ENV_ONLY, FLAGS, CaptureConfig
from pilotfish.init.planner import Detected

DATA = Path(__file__).parent / "data"
CASES = sorted(p.stem for p in DATA.glob("*.json"))
_FIELD_BY_LONG = {f.long: f.field for f in FLAGS}
_FIELD_BY_ENV = {env: name for name, env in ENV_ONLY.items()}


def case_config(name: str) -> tuple[CaptureConfig, Detected]:
    """The case's flags and env-only settings, and its `detected` values to inject."""
    case = json.loads((DATA / f"{name}.json").read_text())
    values = {_FIELD_BY_LONG[k]: v for k, v in case["flags"].items()}
    values.update({_FIELD_BY_ENV[k]: v for k, v in case["env"].items()})
    config = CaptureConfig(**values)
    d = case["detected"]
    detected = Detected(
        enable_ipv6=d["enable_ipv6"],
        dns_servers_v4=tuple(d["dns_servers_v4"]),
        dns_servers_v6=tuple(d["dns_servers_v6"]),
        proxy_uid=config.proxy_uid,
        proxy_gid=config.proxy_gid or config.proxy_uid,
    )
    return config, detected
