"""What routing a capture configuration needs (kept apart from routes.py so that deciding it
does not import pyroute2, which takes ~0.1 s)."""

from __future__ import annotations

from dataclasses import dataclass

PASSTHROUGH_V6 = "::6"  # Envoy's inbound passthrough source address in IPv6


@dataclass(frozen=True)
class RouteSpec:
    """What a configuration needs: policy routing for TPROXY, the ::6 address for IPv6."""

    mark: int
    table: int
    families: tuple[int, ...]
    tproxy: bool  # TPROXY mode with inbound ports to capture
    passthrough_v6: bool  # IPv6 enabled

    @property
    def empty(self) -> bool:
        return not self.tproxy and not self.passthrough_v6
