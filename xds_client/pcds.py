"""The ProxyConfig type (Istio's PCDS): the extra root certificates the control plane tells the
agent to trust for workload-to-workload mTLS (`ProxyConfig.caCertificatesPem`, field 34), served
to Envoy in the ROOTCA secret beside the CA's root (docs/istio-compat.md "xDS proxy").

Asked only with PROXY_CONFIG_XDS_AGENT=true, as Istio's agent. Only that one field is read, so
the message is decoded from the protobuf wire format here rather than with Istio's whole
ProxyConfig schema (hundreds of fields and imports for one repeated string).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.any_pb2 import Any

from .resources import ResourceError, first_of_type

TYPE_URL = "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig"
CA_CERTIFICATES_PEM = 34  # `repeated string ca_certificates_pem = 34` in istio/api mesh/v1alpha1/proxy.proto
MAX_CERTIFICATES = 64  # extra roots of a mesh: a handful


@dataclass(frozen=True)
class MeshTrust:
    serialized: bytes
    ca_pems: tuple[str, ...]  # in the control plane's order


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7


def ca_certificates(data: bytes) -> tuple[str, ...]:
    """Field 34's strings of a serialized ProxyConfig; ValueError for bytes that are not a
    protobuf message (other fields are skipped by their wire type)."""
    found: list[str] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, at = _varint(data, at)
        elif wire == 1:
            at += 8
        elif wire == 5:
            at += 4
        elif wire == 2:
            size, at = _varint(data, at)
            if field == CA_CERTIFICATES_PEM:
                found.append(data[at:at + size].decode("utf-8"))
                if len(found) > MAX_CERTIFICATES:
                    raise ValueError(f"more than {MAX_CERTIFICATES} CA certificates")
            at += size
        else:
            raise ValueError(f"wire type {wire} (groups are not in a ProxyConfig)")
        if at > len(data) or field == 0:
            raise ValueError("truncated message" if at > len(data) else "field number 0")
    return tuple(found)


class ProxyConfigType:
    """PCDS as a resource type; `check` raises on certificates that cannot be trusted."""

    type_url = TYPE_URL
    name = "proxy config"

    def __init__(self, check: Callable[[tuple[str, ...]], None]) -> None:
        self.check = check

    def decode(self, resources: Sequence[Any]) -> MeshTrust:
        return self.from_bytes(first_of_type(resources, TYPE_URL))

    def from_bytes(self, serialized: bytes) -> MeshTrust:
        try:
            pems = ca_certificates(serialized)
            self.check(pems)
        except Exception as err:  # any failure: the NACK says which and why
            raise ResourceError(f"cannot use the ProxyConfig's caCertificatesPem: {type(err).__name__}: {err}") \
                from None
        return MeshTrust(serialized, pems)

    def to_bytes(self, value: MeshTrust) -> bytes:
        return value.serialized
