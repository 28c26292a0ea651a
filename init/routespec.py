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

    def satisfied(self) -> bool:
        """Nothing to install: no TPROXY, and ::6 (if needed) is on lo already. Checked without
        netlink, so an IPv6 rerun does not pay for importing pyroute2."""
        return not self.tproxy and (not self.passthrough_v6 or has_passthrough_address())


def has_passthrough_address() -> bool:
    """Whether ::6 is configured on lo (/proc/net/if_inet6: address, ifindex, ..., name)."""
    try:
        with open("/proc/net/if_inet6") as f:
            return any(line.split()[0] == "0" * 31 + "6" and line.split()[-1] == "lo" for line in f)
    except OSError:
        return False
