#!/usr/bin/env python3
"""`make demo`: a small Bookinfo-like mesh on this machine, the way a user sees it.

Three workloads — productpage → reviews → ratings, plus a plain TCP service (mongodb, an echo in
the ratings pod) — each in its own network namespace with a veth to a bridge in a `node`
namespace. Each pod is Istio's injected pod (tests/pod_harness.py): `pilot-agent istio-iptables`
with DNS capture, then `pilot-agent proxy sidecar` (the agent and Envoy, uid 1337, the template's
environment, a read-only root) and a tiny application (demo/app.py) as uid 1000. The node
namespace holds `pilotfish controlplane` (the mesh file below, STRICT mTLS, its own CA) and the
cluster's DNS (dnsmasq, which knows one external name).

Then, step by step: a name looked up inside productpage, answered by its agent; an HTTP call from
productpage's application to http://reviews:9080/, over mTLS through the Envoys, each hop saying
who called it (SPIFFE IDs); the TCP service; an external name resolved through the upstream; the
control plane stopped, and traffic still flowing. Everything is removed on exit or Ctrl-C; the
demo can be run again. Root only (network namespaces, iptables).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "init")]  # the pod harness
from netns import Topology, ns_argv  # noqa: E402
from pod_harness import NAMESPACE, Pod, ns_http  # noqa: E402

PREFIX = "pfdemo-"
NODE = f"{PREFIX}node"
NODE_IP = "10.244.0.1"
APP_UID = 1000
WORKLOADS = {  # name: (pod IP, cluster IP, what its application calls next)
    "productpage": ("10.244.0.11", "10.96.0.11", "http://reviews:9080/"),
    "reviews": ("10.244.0.12", "10.96.0.12", "http://ratings:9080/"),
    "ratings": ("10.244.0.13", "10.96.0.13", ""),
}
MONGODB_IP, MONGODB_PORT = "10.96.0.14", 27017
EXTERNAL, EXTERNAL_IP = "www.example.org", "93.184.215.14"
RESOLV = f"nameserver {NODE_IP}\nsearch {NAMESPACE}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"


def mesh_file() -> str:
    services = "".join(
        f"  - name: {name}\n    namespace: {NAMESPACE}\n    clusterIP: {vip}\n"
        f"    ports: [{{port: 9080, name: http}}]\n"
        f"    endpoints: [{{addresses: [{ip}], serviceAccount: bookinfo-{name}}}]\n"
        for name, (ip, vip, _) in WORKLOADS.items())
    ratings_ip = WORKLOADS["ratings"][0]
    return (f"services:\n{services}"
            f"  - name: mongodb\n    namespace: {NAMESPACE}\n    clusterIP: {MONGODB_IP}\n"
            f"    ports: [{{port: {MONGODB_PORT}, name: tcp-mongo}}]\n"
            f"    endpoints: [{{addresses: [{ratings_ip}], serviceAccount: bookinfo-ratings}}]\n"
            "peerAuthentications:\n  - {name: default, namespace: istio-system, mtls: {mode: STRICT}}\n")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def remove_namespaces() -> None:
    """Every namespace of this demo (a run interrupted hard may have left some), with what runs in it."""
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "delete", name, check=False)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def network() -> None:
    """The node namespace with a bridge, and a namespace per workload with a veth on it."""
    sh("ip", "netns", "add", NODE)
    sh("ip", "-n", NODE, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", NODE, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
    sh("ip", "-n", NODE, "link", "set", "br0", "up")
    sh("ip", "-n", NODE, "link", "set", "lo", "up")
    for name, (ip, _, _) in WORKLOADS.items():
        ns = f"{PREFIX}{name}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"v-{name}", "netns", NODE)
        for command in (("addr", "add", f"{ip}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                        ("link", "set", "lo", "up"), ("route", "add", "default", "via", NODE_IP)):
            sh("ip", "-n", ns, *command)
        sh("ip", "-n", NODE, "link", "set", f"v-{name}", "master", "br0", "up")


def wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: no {what} within {timeout:g} s")
        time.sleep(0.05)


def ready(pod: Pod) -> bool:
    try:
        return ns_http(NODE, pod.ip, 15020, "/healthz/ready")[0] == 200
    except OSError:
        return False


def in_pod(pod: Pod, *argv: str) -> str:
    """A command in the pod as its application (uid 1000): captured like the application's traffic."""
    done = subprocess.run(ns_argv(pod.ns, list(argv), APP_UID, APP_UID), capture_output=True, text=True, timeout=30,
                          check=False)
    return (done.stdout + done.stderr).rstrip()


def step(title: str, pod: Pod, *argv: str, shown: str = "") -> None:
    print(f"== {title}\n   {pod.name.split('-')[0]}$ {shown or ' '.join(argv)}")
    for line in in_pod(pod, *argv).splitlines():
        print(f"   {line}")
    print()


@contextmanager
def mesh(work: Path) -> Iterator[tuple[dict[str, Pod], subprocess.Popen[bytes]]]:
    remove_namespaces()
    network()
    pods: dict[str, Pod] = {}
    try:
        for name, (ip, _, _) in WORKLOADS.items():
            pods[name] = Pod(Topology(pod=f"{PREFIX}{name}", peer=NODE), work / name, ip=ip, name=f"{name}-v1",
                             service_account=f"bookinfo-{name}", token=f"{name}-token", istiod=NODE_IP, resolv=RESOLV)
        first, *others = pods.values()
        controlplane = first.start_controlplane(mesh_file(), others=tuple(others), ns=NODE)
        root = first.root / "var/run/secrets/istio/root-cert.pem"
        wait(lambda: root.exists() and root.stat().st_size > 0, "root certificate from the control plane")
        for pod in others:
            (pod.root / "var/run/secrets/istio/root-cert.pem").write_bytes(root.read_bytes())
        (work / "hosts").write_text(f"{EXTERNAL_IP} {EXTERNAL}\n")
        (work / "hosts").chmod(0o644)
        first.spawn(NODE, ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                           f"--addn-hosts={work / 'hosts'}", f"--listen-address={NODE_IP}", "--bind-interfaces",
                           "--log-facility=-", "--pid-file=", "--conf-file=/dev/null"], work / "dnsmasq.log")
        for name, pod in pods.items():
            done = pod.init(dns_capture=True)
            if done.returncode != 0:
                raise SystemExit(f"demo: istio-iptables in {name}: {done.stderr}")
            following = WORKLOADS[name][2]
            extra = ["--echo", str(MONGODB_PORT)] if name == "ratings" else []
            app = pod.spawn(pod.ns, [sys.executable, str(HERE / "app.py"), name, "9080",
                                     *([following] if following else []), *extra], pod.work / "app.log", uid=APP_UID)
            wait(lambda pod=pod, app=app: "ready" in pod.log("app.log") or app.poll() is not None,  # type: ignore[misc]
                 f"{name}'s app")
            pod.proxy({"ISTIO_META_DNS_CAPTURE": "true"})
        for pod in pods.values():
            wait(lambda pod=pod: ready(pod), f"{pod.name} ready")  # type: ignore[misc]
        yield pods, controlplane
    finally:
        for pod in pods.values():
            pod.stop()
        remove_namespaces()


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces and iptables): run `sudo make demo`", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="pilotfish-demo-"))
    work.chmod(0o755)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    started = time.monotonic()
    try:
        with mesh(work) as (pods, controlplane):
            productpage = pods["productpage"]
            print(f"== three pods ready in {time.monotonic() - started:.1f} s: productpage, reviews, ratings, each "
                  "with pilot-agent istio-iptables, pilot-agent proxy (Envoy) and its app;\n   "
                  f"pilotfish controlplane and the cluster's DNS on {NODE_IP} (namespace {NODE})\n")
            step("a mesh name, answered by productpage's own agent (DNS captured to :15053)", productpage,
                 "dig", "+search", "+short", "reviews")
            step("productpage's app calls reviews, which calls ratings: each hop over mTLS between the Envoys, "
                 "each app told who called it", productpage, "curl", "-sS", "http://reviews:9080/")
            step("the TCP service (mongodb, an echo in the ratings pod), over mTLS too", productpage, sys.executable,
                 "-c", f"import socket; s = socket.create_connection(('mongodb', {MONGODB_PORT}), timeout=10); "
                       "s.sendall(b'hello mongodb\\n'); print(s.recv(100).decode().strip())",
                 shown=f"echo 'hello mongodb' | nc mongodb {MONGODB_PORT}   (in Python)")
            step("a name outside the mesh: forwarded by the agent to the cluster's DNS", productpage,
                 "dig", "+short", EXTERNAL)
            step("the reviews pod dialled by its IP, not through its service: passed through in plain text, "
                 "and reviews' STRICT mTLS refuses it", productpage, "curl", "-sS", "-m", "5",
                 f"http://{WORKLOADS['reviews'][0]}:9080/")
            controlplane.terminate()
            controlplane.wait(timeout=30)
            step("the control plane is stopped: names and mTLS traffic keep working", productpage,
                 "curl", "-sS", "http://reviews:9080/")
            print(f"== done in {time.monotonic() - started:.1f} s; logs were in {work}, removed with the namespaces")
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything removed")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
