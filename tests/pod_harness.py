"""A Kubernetes pod as Istio's injection renders it (`hello.yaml.injected`), on one machine.

What stands for what:
- the pod's network namespace: `pod` of tests/init/netns.py's topology (eth0 10.77.0.2); the
  rest of the cluster (istiod, kubelet, other pods): the `peer` namespace (10.77.0.1);
- the container's `/`: a directory owned by root, read-only to uid 1337, with the template's
  volumes as writable directories of 1337 (emptyDirs) or files written by the test (the
  downward-API labels and annotations, the token, the root certificate of `istio-ca-root-cert`);
  the agent runs with it as working directory, so Istio's relative paths
  (`./etc/istio/proxy`, `./var/run/secrets/...`) land in it;
- istiod: `pilotfish controlplane` in the peer namespace on 10.77.0.1:15012, reached by the
  name the template gives (`istiod.istio-system.svc`) through /etc/netns/<pod>/hosts, which
  `ip netns exec` mounts over /etc/hosts;
- the istio-init container: `pilot-agent istio-iptables` with the template's argv, as root;
- the istio-proxy container: `pilot-agent proxy sidecar ...` with the template's argv and
  environment only (`env -i`), as uid/gid 1337 with no capabilities.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "init"))

from netns import PEER_V4, POD_V4, Topology, ns_argv, run  # noqa: E402

PROXY_UID = 1337
ISTIOD = "istiod.istio-system.svc"
NAMESPACE, POD, SERVICE_ACCOUNT = "default", "hello-7d4b9c-x2x9z", "hello"
TOKEN = "hello-pod-token"

# `hello.yaml.injected` (Istio's pkg/kube/inject/testdata; docs/istio-compat.md "pilot-agent words")
INIT_ARGV = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
             "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info"]
PROXY_ARGV = ["proxy", "sidecar", "--domain", f"{NAMESPACE}.svc.cluster.local", "--proxyLogLevel=warning",
              "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info"]
LABELS = {"app": "hello", "security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": "hello",
          "service.istio.io/canonical-revision": "latest", "tier": "backend", "track": "stable"}
ANNOTATIONS = {"istio.io/rev": "default", "kubectl.kubernetes.io/default-container": "hello",
               "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020",
               "prometheus.io/scrape": "true"}
# the template's writable volumes (emptyDirs) under the container's `/`
EMPTY_DIRS = ("var/run/secrets/workload-spiffe-uds", "var/run/secrets/credential-uds",
              "var/run/secrets/workload-spiffe-credentials", "var/lib/istio/data", "etc/istio/proxy")


CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def skip_reason() -> str | None:
    """Why a test of Envoy in a pod's network namespace with capture cannot run here, if it cannot."""
    from envoy_proc import available
    from netns import BACKENDS, backend_skip_reason, init_missing_reason
    from netns import skip_reason as netns_skip_reason

    reason = available() or netns_skip_reason() or init_missing_reason()
    if reason:
        return reason
    if all(backend_skip_reason(b) for b in BACKENDS):
        return "no usable iptables backend"
    return None


@pytest.fixture(scope="module", autouse=True)
def pod_environment() -> None:
    """A module of pod tests skipped with the reason where they cannot run, and the namespaces of
    crashed runs tidied first: autouse in a test module that imports it
    (`from pod_harness import pod_environment as _environment`)."""
    from netns import reap_stale_namespaces

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    reap_stale_namespaces()


def in_ns(ns: str, make: Callable[[], T]) -> T:
    """What `make` returns, made inside network namespace `ns` and usable from this thread.

    A socket belongs to the namespace of the thread that made it; a short-lived thread joins
    `ns` (setns is per thread) and makes it, so a test reaches a pod's ports as kubelet or a
    peer would, without a process per request."""
    result: list[T | BaseException] = []

    def join_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{ns}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            result.append(make())
        except BaseException as err:  # noqa: BLE001  handed to the caller's thread
            result.append(err)

    thread = threading.Thread(target=join_and_make)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def ns_connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside network namespace `ns` (in_ns)."""
    return in_ns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


def ns_listen(ns: str, port: int) -> socket.socket:
    """A TCP socket listening on every address of network namespace `ns` (in_ns)."""
    return in_ns(ns, lambda: socket.create_server(("0.0.0.0", port)))


class NsHTTPConnection(http.client.HTTPConnection):
    """HTTP to a port inside a network namespace (ns_connect)."""

    def __init__(self, ns: str, host: str, port: int, timeout: float = 5.0) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ns = ns

    def connect(self) -> None:
        self.sock = ns_connect(self.ns, self.host, self.port, self.timeout)  # type: ignore[arg-type]


def ns_http(ns: str, host: str, port: int, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one request made from inside `ns`."""
    conn = NsHTTPConnection(ns, host, port)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def template_env(extra: dict[str, str] | None = None, pod: str = POD, ip: str = POD_V4,
                 service_account: str = SERVICE_ACCOUNT) -> dict[str, str]:
    """The istio-proxy container's environment as the template renders it for this pod (the
    downward API's values filled in)."""
    env = {
        "PILOT_CERT_PROVIDER": "istiod",
        "CA_ADDR": f"{ISTIOD}:15012",
        "POD_NAME": pod,
        "POD_NAMESPACE": NAMESPACE,
        "INSTANCE_IP": ip,
        "SERVICE_ACCOUNT": service_account,
        "HOST_IP": PEER_V4,
        "ISTIO_CPU_LIMIT": "2",
        "PROXY_CONFIG": "{}\n",
        "ISTIO_META_POD_PORTS": '[\n    {"name":"http","containerPort":80}\n]',
        "ISTIO_META_APP_CONTAINERS": "hello",
        "GOMEMLIMIT": "1073741824",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "ISTIO_META_NODE_NAME": "node-1",
        "ISTIO_META_INTERCEPTION_MODE": "REDIRECT",
        "ISTIO_META_WORKLOAD_NAME": "hello",
        "ISTIO_META_OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/hello",
        "ISTIO_META_MESH_ID": "cluster.local",
        "TRUST_DOMAIN": "cluster.local",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }
    env.update(extra or {})
    return env


def downward_file(values: dict[str, str]) -> str:
    """The downward API's format: `key="value"` lines, values quoted as Go's strconv.Quote."""
    return "".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(values.items()))


def pilot_agent() -> str:
    """The `pilot-agent` console script of the virtualenv the tests run in."""
    return str(Path(sys.executable).with_name("pilot-agent"))


def controlplane() -> list[str]:
    return [str(Path(sys.executable).with_name("pilotfish")), "controlplane"]


@dataclass
class Pod:
    """One injected pod (see the module docstring), its control plane and its processes. By
    default the `pod` namespace of the topology; a second pod can live in the `peer` one (`ns`,
    `ip`), with its own name, service account and token."""

    topo: Topology
    work: Path
    ns: str = ""  # default: topo.pod
    ip: str = POD_V4
    name: str = POD
    service_account: str = SERVICE_ACCOUNT
    token: str = TOKEN
    istiod: str = PEER_V4  # where the pod reaches the control plane (127.0.0.1 beside it)
    # the pod's resolv.conf: by default the cluster's DNS that fails at once (gRPC asks for AAAA
    # too; with the host's resolv.conf, unreachable from the pod, each lookup would wait)
    resolv: str = "nameserver 127.0.0.1\n"
    root: Path = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ns = self.ns or self.topo.pod
        self.work.mkdir(parents=True, exist_ok=True)
        self.root = self.work / "root"
        for d in EMPTY_DIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
            os.chown(self.root / d, PROXY_UID, PROXY_UID)
        podinfo = self.root / "etc/istio/pod"
        podinfo.mkdir(parents=True)
        (podinfo / "labels").write_text(downward_file(LABELS))
        (podinfo / "annotations").write_text(downward_file(ANNOTATIONS))
        token = self.root / "var/run/secrets/tokens/istio-token"
        token.parent.mkdir(parents=True)
        token.write_text(self.token)
        (self.root / "var/run/secrets/istio").mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.rglob("*")):  # the image's files: readable, not writable, by 1337
            if not any(str(path.relative_to(self.root)).startswith(d) for d in EMPTY_DIRS):
                path.chmod(0o755 if path.is_dir() else 0o644)
        self.root.chmod(0o755)
        self.work.chmod(0o755)
        hosts = Path("/etc/netns") / self.ns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{self.istiod} {ISTIOD}\n")
        (hosts.parent / "resolv.conf").write_text(self.resolv)

    def start_controlplane(self, mesh: str, others: tuple[Pod, ...] = (),
                           extra_args: tuple[str, ...] = (), ns: str = "") -> subprocess.Popen[bytes]:
        """`pilotfish controlplane` in the peer namespace (or `ns`) on port 15012, issuing this
        pod's identity and `others'` (the root certificate lands in this pod's root)."""
        cp = self.work / "cp"
        cp.mkdir(exist_ok=True)
        (cp / "mesh.yaml").write_text(mesh)
        (cp / "identities").write_text("".join(f"{p.token} {NAMESPACE}/{p.service_account}\n" for p in (self, *others)))
        (cp / "token").write_text(self.token)
        # on every address of the peer namespace: a pod there reaches it on 127.0.0.1, which the
        # capture rules leave alone for the proxy's uid (its own pod IP they send to 15006)
        argv = [*controlplane(), "--mesh", str(cp / "mesh.yaml"), "--listen", "0.0.0.0:15012",
                "--state-dir", str(cp / "state"), "--root-cert-out", str(self.root / "var/run/secrets/istio/root-cert.pem"),
                "--token-file", str(cp / "token"), "--identities", str(cp / "identities"), "--san", ISTIOD,
                *extra_args]
        return self.spawn(ns or self.topo.peer, argv, cp / "log")

    def spawn(self, ns: str, argv: list[str], log: Path, uid: int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        command = ns_argv(ns, argv, uid, uid)
        if env is not None:
            command = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], *command]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        self.procs.append(proc)
        return proc

    def init(self, exclude_inbound: str = "", dns_capture: bool = False) -> subprocess.CompletedProcess[str]:
        """The istio-init container: the template's argv, as root, in the pod's namespace
        (`exclude_inbound`: more ports for -d, such as the control plane's beside a pod;
        `dns_capture`: ISTIO_META_DNS_CAPTURE in its environment, as the template sets it)."""
        argv = list(INIT_ARGV)
        if exclude_inbound:
            at = argv.index("-d") + 1
            argv[at] += "," + exclude_inbound
        env = {**os.environ, "ISTIO_META_DNS_CAPTURE": "true"} if dns_capture else None
        return run(ns_argv(self.ns, [pilot_agent(), *argv]), timeout=60, check=False, env=env)

    def proxy(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """The istio-proxy container: the template's argv and environment, uid 1337, cwd its `/`."""
        return self.spawn(self.ns, [pilot_agent(), *PROXY_ARGV], self.work / "agent.log", uid=PROXY_UID,
                          env=template_env(extra_env, self.name, self.ip, self.service_account), cwd=self.root)

    def log(self, name: str = "agent.log") -> str:
        return (self.work / name).read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        shutil.rmtree(Path("/etc/netns") / self.ns, ignore_errors=True)
