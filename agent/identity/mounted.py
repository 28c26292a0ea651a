"""Certificates from files instead of the CA (docs/identity.md "Mounted certificates"): the
workload-identity files, FILE_MOUNTED_CERTS' paths, or the legacy ./etc/certs. Served as the
workload certificate (SDS `default` and `ROOTCA`) and read again whenever one of the files
changes, Kubernetes' atomic swap of a Secret's `..data` symlink included (common/watch.py
follows symlinks). A file set that does not load keeps the certificate in use, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pilotfish.common.files import UnreadableFile, read_regular_file
from pilotfish.common.settings import ConfigError, parse_bool
from pilotfish.common.watch import file_signature, watch_file
from pilotfish.xds_client.resources import ResourceCache

from .issued import Issued
from .workload import PEM_LIMIT, WORKLOAD_CERTIFICATE

log = logging.getLogger("pilotfish.identity")

WORKLOAD_IDENTITY_DIR = "./var/run/secrets/workload-spiffe-credentials"
LEGACY_DIR = "./etc/certs"
POLL = 1.0  # seconds between looks at the files (Istio debounces file events by 100 ms)


@dataclass(frozen=True)
class MountedFiles:
    chain: str
    key: str
    root: str
    why: str  # for the log: which rule chose these files


def _in(directory: str) -> tuple[str, str, str]:
    return (os.path.join(directory, "cert-chain.pem"), os.path.join(directory, "key.pem"),
            os.path.join(directory, "root-cert.pem"))


def _all_exist(*paths: str) -> bool:
    return all(os.path.isfile(path) and os.path.getsize(path) > 0 for path in paths)


def mounted_files(env: Mapping[str, str], metadata: Mapping[str, str]) -> MountedFiles | None:
    """The certificate files to serve instead of asking the CA, in Istio's order; None for the CA."""
    chain, key, root = _in(WORKLOAD_IDENTITY_DIR)
    if _all_exist(chain, key, root):
        return MountedFiles(chain, key, root, f"workload identity files in {WORKLOAD_IDENTITY_DIR}")
    if env.get("FILE_MOUNTED_CERTS") and parse_bool(env["FILE_MOUNTED_CERTS"], "FILE_MOUNTED_CERTS"):
        names = ("ISTIO_META_TLS_CLIENT_CERT_CHAIN", "ISTIO_META_TLS_CLIENT_KEY", "ISTIO_META_TLS_CLIENT_ROOT_CERT")
        chain, key, root = (env.get(name) or metadata.get(name, "") for name in names)
        missing = [name for name, path in zip(names, (chain, key, root)) if not path]
        if missing:
            raise ConfigError(f"FILE_MOUNTED_CERTS: {', '.join(missing)} not set")
        return MountedFiles(chain, key, root, "FILE_MOUNTED_CERTS")
    chain, key, root = _in(LEGACY_DIR)
    output = env.get("OUTPUT_CERTS", "")
    if _all_exist(chain, key) and not (output and os.path.abspath(output) == os.path.abspath(LEGACY_DIR)):
        return MountedFiles(chain, key, root, f"files in {LEGACY_DIR}")
    return None


def load(files: MountedFiles) -> Issued:
    """The certificate the files hold; ValueError saying what is wrong."""
    try:
        chain = read_regular_file(files.chain, PEM_LIMIT)
        key = read_regular_file(files.key, PEM_LIMIT)
        root = read_regular_file(files.root, PEM_LIMIT) if os.path.exists(files.root) else b""
    except UnreadableFile as err:
        raise ValueError(str(err)) from None
    leaf = x509.load_pem_x509_certificate(chain)  # ValueError when it is not one
    private = serialization.load_pem_private_key(key, password=None)  # ValueError, TypeError (encrypted)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(serialization.Encoding.DER, spki) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        # a rewrite caught half-way (the chain written, the key not yet): the next look loads both
        raise ValueError(f"{files.key} is not the key of the certificate in {files.chain}")
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise ValueError(f"the certificate in {files.chain} is not valid now (until {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})")
    return Issued(chain, key, root, leaf.not_valid_after_utc, now, leaf.serial_number)


class MountedCertificate:
    """The component serving certificate files; ready once they loaded."""

    name = "identity"

    def __init__(self, files: MountedFiles, cache: ResourceCache) -> None:
        self.files = files
        self.cache = cache
        self.current: Issued | None = None

    def ready(self) -> str | None:
        return None if self.current is not None else f"the certificate files ({self.files.why}) do not load"

    def _load(self, why: str) -> None:
        try:
            issued = load(self.files)
        except (ValueError, TypeError) as err:
            log.warning("identity: the certificate files (%s) do not load (%s): %s; keeping what serves",
                        self.files.why, why, err)
            return
        if self.current is not None and (issued.chain_pem, issued.key_pem, issued.root_pem) == \
                (self.current.chain_pem, self.current.key_pem, self.current.root_pem):
            return
        self.current = issued
        self.cache.swap(WORKLOAD_CERTIFICATE.type_url, f"{issued.serial:x}", issued)
        log.info("identity: serving the certificate in %s (%s), serial %x", self.files.chain, self.files.why,
                 issued.serial)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        paths = (self.files.chain, self.files.key, self.files.root)
        seen = {path: file_signature(path) for path in paths}
        self._load("start")
        task_status.started()

        async def reload(why: str) -> None:
            self._load(why)

        async with trio.open_nursery() as nursery:
            for path in paths:
                nursery.start_soon(watch_file, path, seen[path], POLL, reload)
