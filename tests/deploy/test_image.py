"""The image (Dockerfile, built by deploy/image/build.py as `make image` builds it) used the way
Istio's injection uses its proxy image, in real containers (tests/deploy/containers.py): two pods,
each a pause container, istio-init (NET_ADMIN and NET_RAW only), istio-proxy (uid 1337, read-only
root) and an app container in the pod's network (`--network container:`), and the control plane in
a container of its own. productpage's app resolves a mesh name through the DNS proxy and reaches
reviews over mTLS."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from containers import Cluster, PodSpec, builder, docker, resolv_mount, running_pods, sidecar_ready, wait_for  # noqa: E402,E501
from meshlab import APP, REVIEWS_VIP  # noqa: E402
from netns import APP_UID  # noqa: E402


# What Istio's proxyv2 has and pods rely on, and what a final image must not carry (compilers,
# the wheelhouse, pip); the agent's modules compiled (the root is read-only in a pod).
LAYOUT = """\
set -e
id -u istio-proxy; id -g istio-proxy
/usr/local/bin/envoy --version | grep -q 'envoy  *version'
/usr/local/bin/pilotfish --version >/dev/null
iptables-legacy --version; iptables-nft --version; ip -V >/dev/null; command -v setpriv >/dev/null
stat -c '%u %n' /etc/istio/proxy /var/lib/istio/data
test ! -e /wheelhouse && ! command -v gcc && ! command -v cc
! /usr/local/lib/pilotfish/bin/python -c 'import pip' 2>/dev/null
ls /usr/local/lib/pilotfish/lib/python3.11/site-packages/pilotfish/agent/__pycache__/cli.cpython-311.pyc
"""


@pytest.mark.timeout(900)  # a fresh machine installs docker.io, debootstraps the base and builds the image
def test_the_image_is_laid_out_like_istios_proxy_image(image: str) -> None:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    assert config["Entrypoint"] == ["/usr/local/bin/pilot-agent"] and config["WorkingDir"] == "/"
    assert config["Labels"]["org.opencontainers.image.title"] == "pilotfish"
    out = docker("run", "--rm", "--entrypoint", "sh", image, "-c", LAYOUT)
    assert out.splitlines()[:2] == ["1337", "1337"], out
    assert "iptables v1.8.9 (legacy)" in out and "(nf_tables)" in out, out
    assert "1337 /etc/istio/proxy" in out and "1337 /var/lib/istio/data" in out, out


@pytest.fixture(scope="module")
def mesh(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, PodSpec, PodSpec]]:
    work = tmp_path_factory.mktemp("image-mesh")
    work.chmod(0o755)
    with running_pods(image, work) as (cluster, productpage, reviews):
        cluster.run("reviews-app", "--network", f"container:{cluster.tag}-{reviews.pause}", "--user", f"{APP_UID}",
                    "--read-only", "--entrypoint", "python3", image, "-c", APP)
        yield cluster, productpage, reviews


@pytest.mark.timeout(300)
def test_both_sidecars_get_ready_behind_envoys_health_port(mesh: tuple[Cluster, PodSpec, PodSpec]) -> None:
    cluster, productpage, reviews = mesh
    wait_for(lambda: sidecar_ready(productpage) and sidecar_ready(reviews), "ready sidecars on 15021",
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
    wait_for(lambda: sidecar_ready(productpage) and sidecar_ready(reviews), "ready sidecars on 15021",
             lambda: cluster.logs("productpage-proxy") + cluster.logs("reviews-proxy"))
    out = cluster.run("productpage-app", "--network", f"container:{cluster.tag}-{productpage.pause}", "--user",
                      f"{APP_UID}", "--read-only", *resolv_mount(cluster), "--entrypoint", "python3", cluster.image,
                      "-c", CLIENT, detach=False)
    lines = out.splitlines()
    logs = "\n".join(cluster.logs(n) for n in ("productpage-proxy", "reviews-proxy", "reviews-app"))
    assert lines[:1] == [REVIEWS_VIP], out + logs
    assert "URI=spiffe://cluster.local/ns/default/sa/productpage" in out, out + logs


def test_the_base_is_debootstrapped_from_the_mirror_apt_uses(tmp_path: Path) -> None:
    """Both of apt's formats: deb822 .sources (the security archive's stanza skipped) and one-line."""
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
                       "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian\n"
                       "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert builder.apt_mirror([sources]) == "http://mirror.example/debian"
    listed = tmp_path / "sources.list"
    listed.write_text("# a comment\ndeb [arch=amd64] http://other.example/debian bookworm main\n")
    assert builder.apt_mirror([tmp_path / "missing.list", listed]) == "http://other.example/debian"
    with pytest.raises(SystemExit, match="no apt source for Debian bookworm"):
        builder.apt_mirror([tmp_path / "missing.list"])
