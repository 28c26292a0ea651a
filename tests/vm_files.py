"""Istio's VM files as `istioctl x workload entry configure -o DIR` writes them (docs/vm.md; Istio's
istioctl/pkg/workload/workload.go): cluster.env with its keys sorted and values quoted as
shellescape quotes them, mesh.yaml with the effective ProxyConfig as `defaultConfig`, the root
certificate, the service account's token, and `hosts` with the control plane's address."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

ISTIOD = "istiod.istio-system.svc"


def cluster_env(namespace: str, service_account: str, workload: str, inbound_ports: str = "*",
                exclude_ports: str | None = "22,15090,15021,15020", extra: dict[str, str] | None = None,
                group: str = "") -> str:
    metadata = proxy_metadata(namespace, service_account, workload, group)
    values = {**metadata, "ISTIO_INBOUND_PORTS": inbound_ports, "ISTIO_NAMESPACE": namespace,
              "ISTIO_SERVICE": f"{workload}.{namespace}", "ISTIO_SERVICE_CIDR": "*", "SERVICE_ACCOUNT": service_account,
              **({"ISTIO_LOCAL_EXCLUDE_PORTS": exclude_ports} if exclude_ports is not None else {}), **(extra or {})}
    return "".join(f"{key}={shlex.quote(values[key])}\n" for key in sorted(values))


def proxy_metadata(namespace: str, service_account: str, workload: str, group: str = "") -> dict[str, str]:
    """istioctl's generated proxyMetadata; `group`: `--autoregister` with that WorkloadGroup."""
    return {**({"ISTIO_META_AUTO_REGISTER_GROUP": group} if group else {}),
        "CANONICAL_REVISION": "latest", "CANONICAL_SERVICE": workload, "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_DNS_CAPTURE": "true", "ISTIO_META_MESH_ID": "cluster.local", "ISTIO_META_NETWORK": "",
        "ISTIO_META_WORKLOAD_NAME": workload, "ISTIO_METAJSON_LABELS": json.dumps({"app": workload, "class": "vm"}),
        "POD_NAMESPACE": namespace, "SERVICE_ACCOUNT": service_account, "TRUST_DOMAIN": "cluster.local",
    }


def mesh_yaml(namespace: str, service_account: str, workload: str, group: str = "", probe: str = "") -> str:
    """`probe`: the WorkloadGroup's probe (YAML flow), which istioctl copies to readinessProbe."""
    metadata = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in sorted(proxy_metadata(namespace, service_account,
                                                                                           workload, group).items()))
    readiness = f"  readinessProbe: {probe}\n" if probe else ""
    return f"defaultConfig:\n  discoveryAddress: {ISTIOD}:15012\n  proxyMetadata:\n{metadata}{readiness}"


def write_vm_files(directory: Path, root_cert: bytes, token: str, istiod_ip: str, namespace: str = "default",
                   service_account: str = "productpage", workload: str = "productpage", group: str = "",
                   probe: str = "", **env: object) -> Path:
    """The five files in `directory` (mode 0744, as istioctl writes them); `group` and `probe`: as
    `--autoregister` writes them for that WorkloadGroup; `env`: cluster_env's options."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "cluster.env": cluster_env(namespace, service_account, workload, group=group,
                                   **env).encode(),  # type: ignore[arg-type]
        "mesh.yaml": mesh_yaml(namespace, service_account, workload, group, probe).encode(),
        "root-cert.pem": root_cert,
        "istio-token": token.encode(),
        "hosts": f"{istiod_ip} {ISTIOD}\n".encode(),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o744)
    return directory


def tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under `root` (itself included): mode, owner, group, and the content's hash or
    the link's target; equal before an install and after its uninstall."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        what = os.readlink(path) if path.is_symlink() else (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "")
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out
