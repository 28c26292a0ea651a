"""The image (Dockerfile, built by deploy/image/build.py as `make image` builds it) used the way
Istio's injection uses its proxy image, in real containers: two pods, each a "pause" container
holding the pod's network namespace, the istio-init container (`pilot-agent istio-iptables` with
the template's argv, root with only NET_ADMIN and NET_RAW), the istio-proxy container (`pilot-agent
proxy sidecar` with the template's argv and environment, uid 1337, read-only root, the template's
writable volumes as tmpfs, its secrets and pod info as read-only mounts) and an app container in
the pod's network (`--network container:`); the control plane (`pilotfish controlplane`, the same
image) in its own container, reached by the template's name for istiod through `--add-host`.
The mesh and the reviews app are tests/e2e/meshlab.py's, with the containers' addresses."""

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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
for _folder in (REPO / "tests" / "e2e", REPO / "tests" / "init"):  # meshlab and its harness
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from meshlab import APP, MESH, RESOLV, REVIEWS_VIP  # noqa: E402
from netns import APP_UID, PEER_V4, POD_V4  # noqa: E402
from pod_harness import ANNOTATIONS, INIT_ARGV, ISTIOD, LABELS, PROXY_ARGV, PROXY_UID, downward_file, template_env  # noqa: E402,E501


def _load_builder():  # type: ignore[no-untyped-def]
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
    """The containers and the network of one test module, all removed by `close`."""

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
        full = f"{self.tag}-{name}"
        if detach:
            self.containers.append(full)
            return docker("run", "-d", "--name", full, *args, timeout=timeout)
        return docker("run", "--rm", "--name", full, *args, timeout=timeout, check=False)

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
    ip: str = ""


@pytest.fixture(scope="module")
def image() -> str:
    try:
        builder.ensure_engine()
    except builder.Unavailable as err:
        pytest.skip(f"no Docker engine: {err}")
    return str(builder.build(python=sys.executable))


@pytest.fixture(scope="module")
def mesh(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, PodSpec, PodSpec]]:
    work = tmp_path_factory.mktemp("image-mesh")
    work.chmod(0o755)
    cluster = Cluster(image, work)
    productpage = PodSpec("productpage-1", "productpage", "productpage-token")
    reviews = PodSpec("reviews-1", "reviews", "reviews-token")
    try:
        cluster.create_network()
        cp_ip, productpage.ip, reviews.ip = cluster.hosts[:3]
        start_controlplane(cluster, cp_ip, productpage, reviews)
        root = work / "secrets" / "root-cert.pem"
        wait_for(lambda: root.exists() and root.stat().st_size > 0, "root certificate", lambda: cluster.logs("cp"))
        resolv = work / "resolv.conf"  # the pod's, as kubelet writes it; nothing answers at that nameserver
        resolv.write_text(RESOLV.replace(PEER_V4, cp_ip))
        resolv.chmod(0o644)
        for pod, dns in ((reviews, False), (productpage, True)):
            start_pod(cluster, pod, cp_ip, dns_capture=dns)
        cluster.run("reviews-app", "--network", f"container:{cluster.tag}-reviews-pause", "--user", f"{APP_UID}",
                    "--read-only", "--entrypoint", "python3", image, "-c", APP)
        yield cluster, productpage, reviews
    finally:
        cluster.close()


def start_controlplane(cluster: Cluster, ip: str, *pods: PodSpec) -> None:
    """`pilotfish controlplane` from the image, on 15012, issuing the pods' identities; its root
    certificate lands in work/secrets, mounted in the pods as the istio-ca-root-cert ConfigMap."""
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


def start_pod(cluster: Cluster, pod: PodSpec, cp_ip: str, dns_capture: bool) -> None:
    """The pod's pause container, its istio-init run to completion, then its istio-proxy."""
    short = pod.service_account
    files = cluster.work / short
    (files / "podinfo").mkdir(parents=True)
    (files / "podinfo" / "labels").write_text(downward_file({**LABELS, "app": short}))
    (files / "podinfo" / "annotations").write_text(downward_file(ANNOTATIONS))
    (files / "tokens").mkdir()
    (files / "tokens" / "istio-token").write_text(pod.token)
    for path in (files, *files.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    resolv = ["-v", f"{cluster.work / 'resolv.conf'}:/etc/resolv.conf:ro"]
    pause = f"{cluster.tag}-{short}-pause"
    cluster.run(f"{short}-pause", "--network", cluster.network, "--ip", pod.ip, "--add-host", f"{ISTIOD}:{cp_ip}",
                "--entrypoint", "sleep", cluster.image, "infinity")
    dns = ["-e", "ISTIO_META_DNS_CAPTURE=true"] if dns_capture else []
    done = subprocess.run(["docker", "run", "--rm", "--network", f"container:{pause}", "--cap-drop", "ALL",
                           "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW", *resolv, *dns, cluster.image, *INIT_ARGV],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"istio-init of {short} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    env = template_env({"ISTIO_META_DNS_CAPTURE": "true"} if dns_capture else {}, pod.name, pod.ip,
                       pod.service_account)
    env.pop("PATH")  # the image's own
    tmpfs = [arg for d in EMPTY_DIRS for arg in ("--tmpfs", f"{d}:uid={PROXY_UID},gid={PROXY_UID},mode=0755")]
    cluster.run(f"{short}-proxy", "--network", f"container:{pause}", "--user", f"{PROXY_UID}:{PROXY_UID}",
                "--read-only", "--cap-drop", "ALL", *tmpfs, *resolv,
                "-v", f"{cluster.work / 'secrets'}:/var/run/secrets/istio:ro",
                "-v", f"{files / 'tokens'}:/var/run/secrets/tokens:ro",
                "-v", f"{files / 'podinfo'}:/etc/istio/pod:ro",
                *[arg for k, v in env.items() for arg in ("-e", f"{k}={v}")], cluster.image, *PROXY_ARGV)


def _ready(ip: str) -> bool:
    return http_status(ip, 15021, "/healthz/ready") == 200


@pytest.mark.timeout(900)  # a fresh machine installs docker.io, debootstraps the base and builds the image
def test_both_sidecars_get_ready_behind_envoys_health_port(mesh: tuple[Cluster, PodSpec, PodSpec]) -> None:
    cluster, productpage, reviews = mesh
    wait_for(lambda: _ready(productpage.ip) and _ready(reviews.ip), "ready sidecars on 15021",
             lambda: "\n".join(cluster.logs(n) for n in ("cp", "productpage-proxy", "reviews-proxy")))


# The productpage app: glibc's resolver (the pod's resolv.conf, captured to the DNS proxy), then
# HTTP to the name (captured to Envoy, mTLS to reviews' Envoy, which gives its app the caller's
# identity in x-forwarded-client-cert, echoed back by meshlab's APP).
CLIENT = """\
import socket, sys, urllib.request
print(socket.getaddrinfo("reviews", 9080, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(opener.open("http://reviews:9080/", timeout=10).read().decode())
"""


@pytest.mark.timeout(180)
def test_the_app_resolves_a_mesh_name_and_reaches_the_other_pod_over_mtls(
        mesh: tuple[Cluster, PodSpec, PodSpec]) -> None:
    cluster, productpage, reviews = mesh
    wait_for(lambda: _ready(productpage.ip) and _ready(reviews.ip), "ready sidecars on 15021",
             lambda: cluster.logs("productpage-proxy") + cluster.logs("reviews-proxy"))
    wait_for(lambda: http_status(reviews.ip, 15020, "/healthz/ready") == 200, "reviews' agent", lambda: "")
    out = cluster.run("productpage-app", "--network", f"container:{cluster.tag}-productpage-pause", "--user",
                      f"{APP_UID}", "--read-only", "-v", f"{cluster.work / 'resolv.conf'}:/etc/resolv.conf:ro",
                      "--entrypoint", "python3", cluster.image, "-c", CLIENT, detach=False)
    lines = out.splitlines()
    logs = "\n".join(cluster.logs(n) for n in ("productpage-proxy", "reviews-proxy", "reviews-app"))
    assert lines[:1] == [REVIEWS_VIP], out + logs
    assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in out, out + logs
