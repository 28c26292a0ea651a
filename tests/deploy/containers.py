"""Istio's injected pods as docker containers of the pilotfish image (Dockerfile), for
tests/deploy/test_image.py and bench/image_bench.py: a user-defined bridge network; the control
plane (`pilotfish controlplane` from the image) in a container of its own; per pod a "pause"
container holding the pod's network namespace (reaching istiod by the template's name through
`--add-host`), the istio-init container run to completion (`pilot-agent istio-iptables` with the
template's argv, root with only NET_ADMIN and NET_RAW) and the istio-proxy container (`pilot-agent
proxy sidecar` with the template's argv and environment, uid 1337, read-only root, the template's
emptyDirs as tmpfs, its secrets and downward-API files as read-only mounts). The mesh is
tests/e2e/meshlab.py's with the containers' addresses."""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
for _folder in (REPO / "tests", REPO / "tests" / "e2e", REPO / "tests" / "init"):  # meshlab and its harness
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from meshlab import MESH, PEER_V4, POD_V4, RESOLV  # noqa: E402
from pod_harness import ANNOTATIONS, INIT_ARGV, ISTIOD, LABELS, PROXY_ARGV, PROXY_UID, downward_file, template_env  # noqa: E402,E501


def _load_builder() -> ModuleType:
    """deploy/image/build.py (a script, not a package): what `make image` runs."""
    spec = importlib.util.spec_from_file_location("pilotfish_image_build", REPO / "deploy" / "image" / "build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load_builder()

# the template's emptyDir volumes: tmpfs owned by the proxy's user (/etc/istio/proxy is medium Memory)
EMPTY_DIRS = ("/etc/istio/proxy", "/var/lib/istio/data", "/var/run/secrets/workload-spiffe-uds",
              "/var/run/secrets/credential-uds", "/var/run/secrets/workload-spiffe-credentials")


def docker(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout.strip()


def wait_for(condition: Callable[[], bool], what: str, logs: Callable[[], str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout:.0f}s\n{logs()}")


def http_status(host: str, port: int, path: str) -> int | None:
    """The status of GET `path` from this host (on the docker bridge), None when refused."""
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class Cluster:
    """The containers and the network of one run, all removed by `close`; names are `tag-NAME`."""

    image: str
    work: Path
    tag: str = field(default_factory=lambda: f"pfimg-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    containers: list[str] = field(default_factory=list)
    network: str = ""
    hosts: list[str] = field(default_factory=list)  # addresses handed out on the network

    def create_network(self) -> None:
        """A user-defined bridge with a subnet of our own (`--ip` needs one): the first of a few
        that docker accepts (it refuses one that overlaps another docker network)."""
        for third in (os.getpid() % 200 + i for i in range(20)):
            subnet = ipaddress.ip_network(f"10.213.{third}.0/24")
            done = subprocess.run(["docker", "network", "create", "--subnet", str(subnet), self.tag],
                                  capture_output=True, text=True, timeout=60, check=False)
            if done.returncode == 0:
                self.network = self.tag
                self.hosts = [str(ip) for ip in list(subnet.hosts())[9:20]]  # clear of the gateway (.1)
                return
        raise AssertionError(f"docker network create: no free subnet in 10.213.0.0/16: {done.stderr}")

    def run(self, name: str, *args: str, detach: bool = True, timeout: float = 60.0) -> str:
        """`docker run` of a container named `tag-name`: detached (its id; removed by `close`), or
        run to completion (its output, stdout then stderr)."""
        full = f"{self.tag}-{name}"
        if detach:
            self.containers.append(full)
            return docker("run", "-d", "--name", full, *args, timeout=timeout)
        done = subprocess.run(["docker", "run", "--rm", "--name", full, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        return done.stdout + done.stderr

    def logs(self, name: str) -> str:
        done = subprocess.run(["docker", "logs", "--tail", "60", f"{self.tag}-{name}"], capture_output=True,
                              text=True, timeout=30, check=False)
        return f"--- {name}:\n{done.stdout}{done.stderr}"

    def close(self) -> None:
        if self.containers:
            docker("rm", "-f", *self.containers, timeout=120, check=False)
        if self.network:
            docker("network", "rm", self.network, check=False)


@dataclass
class PodSpec:
    name: str
    service_account: str
    token: str
    dns_capture: bool = False  # ISTIO_META_DNS_CAPTURE in proxyMetadata (the init's and the proxy's env)
    ip: str = ""

    @property
    def pause(self) -> str:
        return f"{self.service_account}-pause"


def start_controlplane(cluster: Cluster, ip: str, *pods: PodSpec) -> None:
    """`pilotfish controlplane` from the image, on 15012, issuing the pods' identities; its root
    certificate lands in work/secrets, mounted in the pods as the istio-ca-root-cert ConfigMap.
    The mesh is meshlab's: the first pod is its productpage, the second its reviews."""
    cp, secrets = cluster.work / "cp", cluster.work / "secrets"
    cp.mkdir()
    secrets.mkdir(mode=0o755)
    (cp / "mesh.yaml").write_text(MESH.replace(PEER_V4, pods[1].ip).replace(POD_V4, pods[0].ip))
    (cp / "identities").write_text("".join(f"{p.token} default/{p.service_account}\n" for p in pods))
    (cp / "token").write_text(pods[1].token)
    cluster.run("cp", "--network", cluster.network, "--ip", ip, "-v", f"{cp}:/cp", "-v", f"{secrets}:/out",
                "--entrypoint", "/usr/local/bin/pilotfish", cluster.image, "controlplane", "--mesh", "/cp/mesh.yaml",
                "--listen", "0.0.0.0:15012", "--state-dir", "/cp/state", "--root-cert-out", "/out/root-cert.pem",
                "--token-file", "/cp/token", "--identities", "/cp/identities", "--san", ISTIOD)


def resolv_mount(cluster: Cluster) -> list[str]:
    """The pod's resolv.conf (kubelet writes one per pod), for every container of it."""
    return ["-v", f"{cluster.work / 'resolv.conf'}:/etc/resolv.conf:ro"]


def start_pod(cluster: Cluster, pod: PodSpec, cp_ip: str) -> None:
    """The pod's pause container and its istio-init, run to completion; the pod's files (token,
    downward-API labels and annotations) in work/<service account>."""
    files = cluster.work / pod.service_account
    (files / "podinfo").mkdir(parents=True)
    (files / "podinfo" / "labels").write_text(downward_file({**LABELS, "app": pod.service_account}))
    (files / "podinfo" / "annotations").write_text(downward_file(ANNOTATIONS))
    (files / "tokens").mkdir()
    (files / "tokens" / "istio-token").write_text(pod.token)
    for path in (files, *files.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cluster.run(pod.pause, "--network", cluster.network, "--ip", pod.ip, "--add-host", f"{ISTIOD}:{cp_ip}",
                "--entrypoint", "sleep", cluster.image, "infinity")
    dns = ["-e", "ISTIO_META_DNS_CAPTURE=true"] if pod.dns_capture else []
    done = subprocess.run(["docker", "run", "--rm", "--network", f"container:{cluster.tag}-{pod.pause}",
                           "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
                           *resolv_mount(cluster), *dns, cluster.image, *INIT_ARGV],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"istio-init of {pod.name} exited {done.returncode}:\n{done.stdout}{done.stderr}"


def start_proxy(cluster: Cluster, pod: PodSpec, name: str = "") -> str:
    """The pod's istio-proxy container (detached); returns its name in the cluster."""
    name = name or f"{pod.service_account}-proxy"
    files = cluster.work / pod.service_account
    env = template_env({"ISTIO_META_DNS_CAPTURE": "true"} if pod.dns_capture else {}, pod.name, pod.ip,
                       pod.service_account)
    env.pop("PATH")  # the image's own
    tmpfs = [arg for d in EMPTY_DIRS for arg in ("--tmpfs", f"{d}:uid={PROXY_UID},gid={PROXY_UID},mode=0755")]
    cluster.run(name, "--network", f"container:{cluster.tag}-{pod.pause}", "--user", f"{PROXY_UID}:{PROXY_UID}",
                "--read-only", "--cap-drop", "ALL", *tmpfs, *resolv_mount(cluster),
                "-v", f"{cluster.work / 'secrets'}:/var/run/secrets/istio:ro",
                "-v", f"{files / 'tokens'}:/var/run/secrets/tokens:ro",
                "-v", f"{files / 'podinfo'}:/etc/istio/pod:ro",
                *[arg for k, v in env.items() for arg in ("-e", f"{k}={v}")], cluster.image, *PROXY_ARGV)
    return name


def sidecar_ready(pod: PodSpec) -> bool:
    """kubelet's startup probe: GET :15021/healthz/ready (Envoy, backed by the agent) is 200."""
    return http_status(pod.ip, 15021, "/healthz/ready") == 200


def mesh_pods() -> tuple[PodSpec, PodSpec]:
    """meshlab's two pods: productpage (DNS capture on) and reviews, each with its token."""
    return (PodSpec("productpage-1", "productpage", "productpage-token", dns_capture=True),
            PodSpec("reviews-1", "reviews", "reviews-token"))


def start_mesh(cluster: Cluster, productpage: PodSpec, reviews: PodSpec) -> str:
    """The network, the pods' addresses, the control plane (waited for: its root certificate is
    in work/secrets) and the pods' resolv.conf (work/resolv.conf); returns the control plane's
    address. The pods themselves are the caller's to start."""
    cluster.create_network()
    cp_ip, productpage.ip, reviews.ip = cluster.hosts[:3]
    start_controlplane(cluster, cp_ip, productpage, reviews)
    root = cluster.work / "secrets" / "root-cert.pem"
    wait_for(lambda: root.exists() and root.stat().st_size > 0, "root certificate", lambda: cluster.logs("cp"))
    resolv = cluster.work / "resolv.conf"  # meshlab's pod resolv.conf; nothing answers at its nameserver
    resolv.write_text(RESOLV.replace(PEER_V4, cp_ip))
    resolv.chmod(0o644)
    return cp_ip


@contextmanager
def running_pods(image: str, work: Path, proxies: bool = True) -> Iterator[tuple[Cluster, PodSpec, PodSpec]]:
    """meshlab's two pods, productpage (DNS capture on) and reviews, as containers beside the
    control plane: network, control plane, pause and init containers, and (`proxies`) the
    istio-proxy containers, not waited for. Everything is removed on exit."""
    cluster = Cluster(image, work)
    productpage, reviews = mesh_pods()
    try:
        cp_ip = start_mesh(cluster, productpage, reviews)
        for pod in (productpage, reviews):
            start_pod(cluster, pod, cp_ip)
            if proxies:
                start_proxy(cluster, pod)
        yield cluster, productpage, reviews
    finally:
        cluster.close()
