"""The client certificate the agent presents to the control plane, when it has one.

Istio's agent presents `<PROV_CERT>/cert-chain.pem` with `key.pem` (or, with FILE_MOUNTED_CERTS,
the mounted client certificate) on its connection to istiod, so that a VM whose one-hour
bootstrap token has expired still authenticates: with the certificate the CA issued it, which
the agent keeps renewing into the same directory (OUTPUT_CERTS). A certificate that cannot be
read, does not parse, has expired or does not go with the key is left out and the token alone is
sent, as Istio does for an unparsable or expired one ("using token instead"); the reason is
given back for the log.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pilotfish.common.files import UnreadableFile, read_regular_file

PEM_LIMIT = 1 << 20  # a key or a chain is a few KiB; this bounds a file that is something else


def client_certificate(key_path: str, chain_path: str, now: datetime) -> tuple[bytes, bytes] | str:
    """(key PEM, chain PEM) to present, or why there is none to present."""
    try:
        key_pem = read_regular_file(key_path, PEM_LIMIT)
        chain_pem = read_regular_file(chain_path, PEM_LIMIT)
    except UnreadableFile as err:
        return f"{key_path} or {chain_path}: {err}"
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, IndexError) as err:
        return f"{chain_path} with {key_path}: {err or type(err).__name__}"
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        return f"{chain_path}: not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to " \
               f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        return f"{chain_path}: the certificate is not {key_path}'s (caught between the two files' renewal?)"
    return key_pem, chain_pem
