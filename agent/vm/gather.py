"""The facts `pilotfish vm status` judges (health.py), gathered from this machine: each iptables
backend's nat table, the agent's status port, the workload certificate the agent wrote under the
root (OUTPUT_CERTS=./etc/certs), systemd. Every read is bounded in time and size."""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time

from pilotfish.common.files import UnreadableFile, read_regular_file

from ..localwords import RequestFailed, exchange
from .health import Certificate, Facts
from .install import systemd_running
from .layout import UNIT_NAME

SAVE_TOOLS = {"nft": "iptables-nft-save", "legacy": "iptables-legacy-save"}
CERT_CHAIN = "etc/certs/cert-chain.pem"
TIMEOUT = 3.0
MAX_BODY = 16 << 20  # a large mesh's metrics are a few MiB


def nat_rules() -> dict[str, str]:
    """backend -> `iptables-*-save -t nat` (the backends whose tool is installed)."""
    out = {}
    for backend, tool in SAVE_TOOLS.items():
        if shutil.which(tool) is None:
            continue
        done = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, timeout=30, check=False)
        out[backend] = done.stdout if done.returncode == 0 else ""
    if not out and shutil.which("iptables-save"):
        done = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True, timeout=30, check=False)
        out["iptables"] = done.stdout
    return out


def http_get(port: int, path: str) -> tuple[int, str] | str:
    """(status, body) of GET http://127.0.0.1:port/path, or why there is none."""
    try:
        status, body = exchange("127.0.0.1", port, "GET", path, b"", TIMEOUT, MAX_BODY)
    except (OSError, http.client.HTTPException, RequestFailed) as err:
        return str(err) or type(err).__name__
    return status, body.decode("utf-8", "replace")


def certificate(root: str) -> Certificate | str:
    from cryptography import x509

    path = os.path.join(root, CERT_CHAIN)
    try:
        cert = x509.load_pem_x509_certificate(read_regular_file(path, 1 << 20))
    except UnreadableFile as err:
        return f"none at {path} ({err}): the agent has not been issued one yet" if err.missing else f"{path}: {err}"
    except ValueError as err:
        return f"{path}: not a PEM certificate: {err}"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = next((u for u in uris if u.startswith("spiffe://")), cert.subject.rfc4514_string() or "no SPIFFE id")
    return Certificate(spiffe, cert.not_valid_after_utc.timestamp())


def unit_state() -> str | None:
    if not systemd_running():
        return None
    done = subprocess.run(["systemctl", "is-active", UNIT_NAME], capture_output=True, text=True, timeout=30,
                          check=False)
    return done.stdout.strip() or f"unknown ({done.stderr.strip()})"


def gather(root: str, status_port: int) -> Facts:
    metrics = http_get(status_port, "/stats/prometheus")
    return Facts(
        now=time.time(),
        rules=nat_rules(),
        ready=http_get(status_port, "/healthz/ready"),
        metrics=metrics[1] if isinstance(metrics, tuple) and metrics[0] == 200 else "",
        certificate=certificate(root),
        unit=unit_state() if os.path.abspath(root) == "/" else None,
    )
