"""The identity's settings from pilot-agent's environment (docs/identity.md "Settings"). Pure:
the environment, who the workload is, the discovery connection and a check of the files named
are passed in. A value that does not parse is an error naming the variable and the value (Istio
falls back to the default, which hides typos).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pilotfish.common.settings import ConfigError, parse_bool, parse_duration, split_host_port

from ..files import root_cert_problem
from .keys import KeySpec, spiffe_id

DEFAULT_CA_ROOT = "./var/run/secrets/istio/root-cert.pem"
CUSTOM_CA_ROOT = "./etc/certs/root-cert.pem"
SYSTEM = "SYSTEM"
MAX_TTL = 366 * 24 * 3600.0  # seconds: a year (istiod caps workload certificates at 90 days)
MAX_RSA_BITS = 8192  # a new key at every rotation: 8192 bits take seconds to make, 16384 minutes
PLAINTEXT_PORT = 15010  # istiod's plaintext (debug) port: no TLS to the CA there, as in Istio


@dataclass(frozen=True)
class IdentityConfig:
    identity: str  # the SPIFFE ID asked for
    key: KeySpec
    ttl_seconds: int  # SECRET_TTL, asked of the CA
    grace_ratio: float
    grace_jitter: float
    ca_address: str
    ca_server_name: str
    ca_root: str | None  # PEM file, SYSTEM, or None for plaintext
    prov_cert: str  # PROV_CERT: a directory with key.pem and cert-chain.pem for mTLS to the CA ("" for none)
    cert_signer: str  # ISTIO_META_CERT_SIGNER, sent as the CertSigner metadata ("" when unset)
    ca_headers: tuple[tuple[str, str], ...]
    output_certs: str  # OUTPUT_CERTS: where to write the certificates ("" for nowhere)


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    text = env.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: not a number: {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: {text!r} is out of range [{low:g}, {high:g}]")
    return value


def key_spec(env: Mapping[str, str]) -> KeySpec:
    size_text = env.get("WORKLOAD_RSA_KEY_SIZE", "") or "2048"
    if not size_text.isdigit() or not 0 < int(size_text) <= MAX_RSA_BITS:
        raise ConfigError(f"WORKLOAD_RSA_KEY_SIZE: want a key size in bits up to {MAX_RSA_BITS}, got {size_text!r}")
    return KeySpec(
        algorithm="ECDSA" if env.get("ECC_SIGNATURE_ALGORITHM", "") == "ECDSA" else "RSA",
        rsa_bits=int(size_text),
        curve="P384" if env.get("ECC_CURVE", "") == "P384" else "P256",
        pkcs8=parse_bool(env["PKCS8_KEY"], "PKCS8_KEY") if env.get("PKCS8_KEY") else False,
    )


def ca_root(env: Mapping[str, str], plaintext: bool, problem: Callable[[str], str | None]) -> str | None:
    """The root for the CA connection, in Istio's order: CA_ROOT_CA (SYSTEM for the OS store);
    ./etc/certs/root-cert.pem with PILOT_CERT_PROVIDER=custom; <PROV_CERT>/root-cert.pem; the
    default file. The file must be usable (a start-up error otherwise, as in Istio)."""
    if plaintext:
        return None
    named = env.get("CA_ROOT_CA", "")
    if named == SYSTEM:
        return SYSTEM
    if named:
        path, setting = named, "CA_ROOT_CA"
    elif env.get("PILOT_CERT_PROVIDER") == "custom":
        path, setting = CUSTOM_CA_ROOT, "PILOT_CERT_PROVIDER=custom"
    elif env.get("PROV_CERT"):
        path, setting = os.path.join(env["PROV_CERT"], "root-cert.pem"), "PROV_CERT"
    else:
        path, setting = DEFAULT_CA_ROOT, "CA_ROOT_CA (unset: the default)"
    why = problem(path)
    if why is not None:
        raise ConfigError(f"{setting}: root CA file for the CA {why}: {path}")
    return path


def identity_config(env: Mapping[str, str], namespace: str, service_account: str, discovery_address: str,
                    discovery_server_name: str, problem: Callable[[str], str | None] = root_cert_problem,
                    header_value: Callable[[str, str], str] = lambda value, setting: value) -> IdentityConfig:
    """The identity's settings; ConfigError naming the variable."""
    if env.get("PROV_CERT") and env.get("FILE_MOUNTED_CERTS", "").lower() in ("1", "t", "true"):
        raise ConfigError("PROV_CERT and FILE_MOUNTED_CERTS cannot both be set (as in Istio)")
    ttl = parse_duration(env["SECRET_TTL"], "SECRET_TTL") if env.get("SECRET_TTL") else 86400.0
    if not 1 <= ttl <= MAX_TTL:
        raise ConfigError(f"SECRET_TTL: want a duration from 1s to {MAX_TTL // 3600:.0f}h, got {env['SECRET_TTL']!r}")
    address = env.get("CA_ADDR", "") or discovery_address
    host, port = split_host_port(address, "CA_ADDR" if env.get("CA_ADDR") else "discovery address")
    name = (host or discovery_server_name) if env.get("CA_ADDR") else discovery_server_name
    plaintext = port == PLAINTEXT_PORT
    headers = tuple(sorted((k[len("CA_HEADER_"):], header_value(v, k)) for k, v in env.items()
                           if k.startswith("CA_HEADER_")))
    return IdentityConfig(
        identity=spiffe_id(env.get("TRUST_DOMAIN", "cluster.local"), namespace, service_account),
        key=key_spec(env),
        ttl_seconds=int(ttl),
        grace_ratio=_float(env, "SECRET_GRACE_PERIOD_RATIO", 0.5, 0.0, 1.0),
        grace_jitter=_float(env, "SECRET_GRACE_PERIOD_RATIO_JITTER", 0.01, 0.0, 1.0),
        ca_address=address,
        ca_server_name=name,
        ca_root=ca_root(env, plaintext, problem),
        prov_cert=env.get("PROV_CERT", ""),
        cert_signer=env.get("ISTIO_META_CERT_SIGNER", ""),
        ca_headers=headers,
        output_certs=env.get("OUTPUT_CERTS", ""),
    )

