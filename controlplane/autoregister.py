"""Auto-registration, as istiod's WorkloadEntry controller does it (docs/controlplane.md
"Auto-registration"): a proxy that connects with node metadata `AUTO_REGISTER_GROUP` becomes a
WorkloadEntry of that WorkloadGroup, health from its agent's HealthInformation requests, and is
removed a grace period after its last connection ends, unless it reconnects first.

Pure: connections, health reports and the time come in (the ADS shell and the model,
controlplane/model.py), events come out; no I/O, no clock. What is kept per entry is what the
proxy said when it connected; the entry itself (labels, service account, ports) is made from
its group as the mesh file has it now (`entries`), so a changed group applies at once and a
removed group's entries are gone.

Only the group's own workloads register, as istiod checks a connection's identity: a stream whose
authenticated identity (a SPIFFE ID) is not the group's namespace and service account is refused,
and so is one that authenticated with no workload's identity (the shared --token-file). Without
it, any proxy with any token could add its address to any Service selecting a group, and take
its traffic, or fill the group's bound and keep its VMs out.

Bounded, since a workload may still connect with any IP: at most `max_per_group`
entries per group and `max_total` in all. When full, the longest-disconnected entry of the group
(going away anyway) makes room; with every entry connected, the proxy is refused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3.base_pb2 import Node
from google.protobuf.struct_pb2 import Value

from .nametable import Health, ProxyInfo
from .workloads import WorkloadEntry, WorkloadGroup

DEFAULT_GRACE = 10.0  # seconds: istiod's PILOT_WORKLOAD_ENTRY_GRACE_PERIOD
MAX_PER_GROUP = 256
MAX_TOTAL = 4096
MAX_LABELS = 64  # labels one proxy may bring (LABELS metadata)
MAX_NAME = 253  # a Kubernetes resource name; istiod keeps the end of a longer one
LOCALITY_LABEL = "istio-locality"  # istiod drops it from the entry's labels


class RegistrationError(ValueError):
    """The proxy's metadata asks for auto-registration that cannot be done; the message says why."""


@dataclass(frozen=True)
class Registration:
    """What a connecting proxy's node says about the entry it wants."""

    group: str
    namespace: str
    address: str
    network: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    health_checked: bool = False  # PROXY_CONFIG has a readinessProbe: its agent reports health

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, entry_name(self.group, self.address, self.network)


def entry_name(group: str, address: str, network: str) -> str:
    """istiod's `<group>-<ip>[-<network>]`, an IPv6 address with `-` for `:`, at most 253
    characters (the end kept, as istiod)."""
    name = "-".join(p for p in (group, address.replace(":", "-"), network) if p)
    return name[-MAX_NAME:]


def _string(value: Value | None) -> str:
    return value.string_value if value is not None and value.WhichOneof("kind") == "string_value" else ""


def registration(node: Node, proxy: ProxyInfo) -> Registration | None:
    """The registration the node asks for (metadata AUTO_REGISTER_GROUP), None if it asks for
    none; RegistrationError if it asks badly. The address is the proxy's first IP and the
    namespace its NAMESPACE, as istiod takes them; labels are its LABELS less istio-locality."""
    fields = node.metadata.fields
    group = _string(fields.get("AUTO_REGISTER_GROUP"))
    if not group:
        return None
    namespace = _string(fields.get("NAMESPACE"))
    if not namespace:
        raise RegistrationError(f"AUTO_REGISTER_GROUP {group!r}: the node has no NAMESPACE")
    address = ipaddress.ip_address(proxy.ips[0])  # proxy_info took only IPs
    if address.is_unspecified or address.is_multicast:
        raise RegistrationError(f"AUTO_REGISTER_GROUP {group!r}: {address} is not a workload's address")
    labels: dict[str, str] = {}
    raw = fields.get("LABELS")
    if raw is not None and raw.WhichOneof("kind") == "struct_value":
        items = raw.struct_value.fields
        if len(items) > MAX_LABELS:
            raise RegistrationError(f"AUTO_REGISTER_GROUP {group!r}: {len(items)} LABELS, at most {MAX_LABELS}")
        for key, value in items.items():
            text = _string(value)
            if len(key) > 317 or len(text) > 63:
                raise RegistrationError(f"AUTO_REGISTER_GROUP {group!r}: label {key[:80]!r} is too long")
            if key != LOCALITY_LABEL:
                labels[key] = text
    config = fields.get("PROXY_CONFIG")
    checked = (config is not None and config.WhichOneof("kind") == "struct_value"
               and "readinessProbe" in config.struct_value.fields)
    return Registration(group, namespace, str(address), proxy.network, labels, checked)


def spiffe_parts(identity: str) -> tuple[str, str] | None:
    """(namespace, service account) of `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`, else None."""
    scheme, _, path = identity.partition("://")
    parts = path.split("/")
    if scheme != "spiffe" or len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
        return None
    return parts[2], parts[4]


def identity_problem(identity: str | None, reg: Registration, group: WorkloadGroup) -> str | None:
    """Why a stream authenticated as `identity` may not register in `group`, or None if it may.
    `identity`: None when the server authenticates no one (nothing to check), "" when the stream
    authenticated without a workload identity (the shared token), else its SPIFFE ID."""
    if identity is None:
        return None
    want = f"{group.namespace}/{group.service_account}"
    if not identity:
        return (f"the stream authenticated with the shared token, which names no workload; WorkloadGroup "
                f"{group.namespace}/{group.name} takes the token of service account {want}")
    if spiffe_parts(identity) != (reg.namespace, group.service_account) or reg.namespace != group.namespace:
        return f"the stream's identity {identity} is not WorkloadGroup {group.namespace}/{group.name}'s service account {want}"
    return None


# What happened, for the shell to log.


@dataclass(frozen=True)
class Registered:
    namespace: str
    name: str
    address: str
    health_checked: bool


@dataclass(frozen=True)
class Reconnected:
    namespace: str
    name: str


@dataclass(frozen=True)
class Refused:
    reason: str
    exhausted: bool = False  # a bound, not bad metadata
    denied: bool = False  # the stream's identity is not the group's


@dataclass(frozen=True)
class HealthChanged:
    namespace: str
    name: str
    healthy: bool
    reason: str


@dataclass(frozen=True)
class Disconnected:
    namespace: str
    name: str
    remove_at: float


@dataclass(frozen=True)
class Removed:
    namespace: str
    name: str
    why: str


Event = Registered | Reconnected | Refused | HealthChanged | Disconnected | Removed


@dataclass
class _Record:
    registration: Registration
    connections: set[str] = field(default_factory=set)
    healthy: bool | None = None  # the last report; None before any
    disconnected_at: float | None = None


class Registry:
    """The auto-registered entries and the connections that hold them."""

    def __init__(self, grace: float = DEFAULT_GRACE, max_per_group: int = MAX_PER_GROUP,
                 max_total: int = MAX_TOTAL) -> None:
        self.grace = grace
        self.max_per_group = max_per_group
        self.max_total = max_total
        self._records: dict[tuple[str, str], _Record] = {}  # (namespace, entry name)
        self._by_connection: dict[str, tuple[str, str]] = {}

    def connect(self, connection: str, reg: Registration, groups: Mapping[tuple[str, str], WorkloadGroup],
                now: float, identity: str | None = None) -> list[Event]:
        """A proxy connected on `connection`, authenticated as `identity` (identity_problem),
        asking for `reg`: its entry is made, or kept if it exists (a reconnect within the grace
        period)."""
        group = groups.get((reg.namespace, reg.group))
        if group is None:
            # istiod's words: the proxy is refused, it would serve traffic no one can route to it
            return [Refused(f"auto-registration of {reg.address} failed: cannot find WorkloadGroup "
                            f"{reg.namespace}/{reg.group}")]
        denied = identity_problem(identity, reg, group)
        if denied is not None:
            return [Refused(f"auto-registration of {reg.address} refused: {denied}", denied=True)]
        key = reg.key
        record = self._records.get(key)
        events: list[Event] = []
        if record is None:
            room = self._make_room(reg, now)
            if isinstance(room, Refused):
                return [room]
            events += room
            record = self._records[key] = _Record(reg)
            events.append(Registered(key[0], key[1], reg.address, self._checked(record, groups)))
        else:
            record.registration = reg  # its labels or health check may have changed
            record.disconnected_at = None
            events.append(Reconnected(*key))
        record.connections.add(connection)
        self._by_connection[connection] = key
        return events

    def _make_room(self, reg: Registration, now: float) -> list[Event] | Refused:
        """Removals that keep the bounds with one entry more, or Refused."""
        same = [k for k, r in self._records.items() if (k[0], r.registration.group) == (reg.namespace, reg.group)]
        if len(same) < self.max_per_group and len(self._records) < self.max_total:
            return []
        pool = same if len(same) >= self.max_per_group else list(self._records)
        idle = [k for k in pool if self._records[k].disconnected_at is not None]
        if not idle:
            limit = (f"WorkloadGroup {reg.namespace}/{reg.group} has {len(same)} connected entries, at most "
                     f"{self.max_per_group}" if len(same) >= self.max_per_group
                     else f"{len(self._records)} connected entries in all, at most {self.max_total}")
            return Refused(f"auto-registration of {reg.address} refused: {limit}", exhausted=True)
        oldest = min(idle, key=lambda k: self._records[k].disconnected_at or 0.0)
        del self._records[oldest]
        return [Removed(*oldest, "room for a new entry")]

    def report_health(self, connection: str, healthy: bool, reason: str = "") -> list[Event]:
        """The agent on `connection` reported its health (a HealthInformation request); nothing
        for a connection without an entry."""
        key = self._by_connection.get(connection)
        record = self._records.get(key) if key else None
        if key is None or record is None or record.healthy is healthy:
            return []
        record.healthy = healthy
        return [HealthChanged(key[0], key[1], healthy, reason)]

    def disconnect(self, connection: str, now: float) -> list[Event]:
        """`connection` ended; its entry goes after the grace period when it was the last."""
        key = self._by_connection.pop(connection, None)
        record = self._records.get(key) if key else None
        if key is None or record is None:
            return []
        record.connections.discard(connection)
        if record.connections:
            return []
        record.disconnected_at = now
        return [Disconnected(key[0], key[1], now + self.grace)]

    def expire(self, now: float) -> list[Event]:
        """Entries disconnected for the grace period or longer, removed."""
        gone = [k for k, r in self._records.items()
                if r.disconnected_at is not None and now - r.disconnected_at >= self.grace]
        for key in gone:
            del self._records[key]
        return [Removed(*key, f"disconnected for {self.grace:g}s") for key in gone]

    def next_expiry(self) -> float | None:
        times = [r.disconnected_at + self.grace for r in self._records.values() if r.disconnected_at is not None]
        return min(times) if times else None

    @staticmethod
    def _checked(record: _Record, groups: Mapping[tuple[str, str], WorkloadGroup]) -> bool:
        """Health-checked when its group has a probe, or when the proxy runs one (istiod's rule:
        PROXY_CONFIG.readinessProbe gives the entry its health-check annotation)."""
        group = groups.get((record.registration.namespace, record.registration.group))
        return record.registration.health_checked or (group is not None and group.probe is not None)

    def entries(self, groups: Mapping[tuple[str, str], WorkloadGroup]) -> tuple[WorkloadEntry, ...]:
        """The entries as the model serves them, sorted by key. Labels: the group's, the proxy's
        over them; a health-checked entry is ready only once its agent reported it healthy."""
        out = []
        for (namespace, name), record in sorted(self._records.items()):
            reg = record.registration
            group = groups.get((namespace, reg.group))
            if group is None:
                continue  # its group left the mesh file
            ready = record.healthy is True or not self._checked(record, groups)
            out.append(WorkloadEntry(
                name=name, namespace=namespace, group=reg.group, address=reg.address,
                labels={**group.labels, **reg.labels}, service_account=group.service_account,
                network=reg.network or group.network, ports=group.ports,
                health=Health.HEALTHY if ready else Health.UNHEALTHY))
        return tuple(out)

    def __len__(self) -> int:
        return len(self._records)
