#!/usr/bin/env python3
"""Control-plane benchmark: how long `pilotfish controlplane` takes to load a mesh file of
10,000 and 100,000 services, YAML and JSON, against PyYAML's own loader in the same run.

Run as `.venv/bin/python bench/controlplane_bench.py` (about 3 minutes on 2 cores).

The mesh is a mix like a cluster's: of every 10 entries, 8 ClusterIP Services with 2 pods each,
one headless Service with 3 named pods (hostname/subdomain), one DNS ServiceEntry whose address
is auto-allocated. It is written block-style as a person (or `yaml.safe_dump`) writes YAML, and
as `json.dumps` writes JSON. Each figure is a fresh Python process (a warm process, or one whose
garbage collector has seen an earlier load, is faster), median of `--runs`:
- load: `controlplane.command.load_snapshot`, what the control plane does at start and on every
  reload: read, parse, check every field, build the model, digest the version;
- parse: the text to values only (`controlplane.document.load_document`);
- PyYAML: `yaml.load(text, Loader=yaml.CSafeLoader)`, the parse-only peer (libyaml's C parser
  with PyYAML's node graph and Python constructor: what the control plane used before);
- peak: the process's peak RSS (VmHWM) in that run, the interpreter and imports included.
With `--before REV` the `load` of the code at git revision REV is measured too, in the same run
(its packages are unpacked from git into a temporary tree put first on PYTHONPATH).
`--sizes 10000,100000`, `--runs 3`, `--json PATH`; `--peer-runs 1` for PyYAML and REV at 100,000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

import yaml
from benchlib import REPO, git_commit, med, write_report

STAGES = ("load", "parse", "pyyaml")
PACKAGES = ("agent", "common", "controlplane", "dns", "init", "xds_client")  # pyproject's package-dir


def source_tree(rev: str, into: Path) -> Path:
    """The `pilotfish` packages as they were at `rev`, importable from the returned directory."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, *PACKAGES], capture_output=True,
                             check=True, timeout=60).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    package = into / "importable" / "pilotfish"
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    for name in PACKAGES:
        (package / name).symlink_to(into / name)
    return package.parent


def mesh_document(n: int) -> dict[str, Any]:
    """`n` entries of the mix above, with unique names and addresses (up to 1,000,000)."""
    services: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    for i in range(n):
        ns, name = f"ns-{i // 100}", f"svc-{i % 100}"
        low = f"{(i >> 8) & 255}.{i & 255}"

        def pod(p: int, i: int = i, low: str = low) -> str:  # 10.128.0.0/10 and up: pods
            return f"10.{128 + p * 16 + (i >> 16)}.{low}"

        if i % 10 == 9:
            entries.append({"name": name, "namespace": ns, "hosts": [f"{name}.{ns}.example.com"],
                            "resolution": "DNS", "ports": [{"number": 443, "name": "https", "protocol": "TLS"}]})
        elif i % 10 == 8:
            services.append({"name": name, "namespace": ns, "clusterIP": "None", "ports": [{"port": 5432, "name": "pg"}],
                             "endpoints": [{"addresses": [pod(p)], "hostname": f"db-{p}", "subdomain": name}
                                           for p in range(3)]})
        else:
            services.append({"name": name, "namespace": ns, "clusterIPs": [f"10.{96 + (i >> 16)}.{low}"],
                             "ports": [{"port": 8080, "name": "http"}],
                             "endpoints": [{"addresses": [pod(p)]} for p in range(2)]})
    return {"clusterDomain": "cluster.local", "services": services, "serviceEntries": entries}


def child(stage: str, path: str) -> None:
    """One measurement in this fresh process; prints {"seconds", "peak_mib", "services"}."""
    text = Path(path).read_text(encoding="utf-8") if stage != "load" else ""
    started = time.perf_counter()
    if stage == "load":
        from pilotfish.controlplane.command import load_snapshot

        count = load_snapshot(path).hosts
    elif stage == "parse":
        from pilotfish.controlplane.document import load_document

        document = load_document(text)
        count = len(document["services"]) + len(document["serviceEntries"])
    else:
        document = yaml.load(text, Loader=yaml.CSafeLoader)
        count = len(document["services"]) + len(document["serviceEntries"])
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would show the parent's
    # RSS at fork (holding the 100,000-service document) instead of this process's.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak, "services": count}))


class Figure(TypedDict):
    services: int
    format: str
    stage: str
    seconds: list[float]
    median_s: float
    peak_mib: float


def measure(stage: str, path: Path, n: int, fmt: str, runs: int, tree: Path | None = None) -> Figure:
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    samples = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, __file__, "--child", stage, str(path)],
                              capture_output=True, text=True, timeout=600, check=True, env=env)
        samples.append(json.loads(done.stdout.splitlines()[-1]))
    seconds = [s["seconds"] for s in samples]
    return {"services": n, "format": fmt, "stage": stage, "seconds": seconds,
            "median_s": med(seconds) or 0.0, "peak_mib": max(s["peak_mib"] for s in samples)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer-runs", type=int, default=1, help="runs of PyYAML's loader (and REV) at 100,000+")
    parser.add_argument("--before", metavar="REV", help="also measure `load` at this git revision")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    print(f"pilotfish control plane benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %z')}  "
          f"commit {git_commit('controlplane')}  {os.cpu_count()} CPUs  PyYAML {yaml.__version__} "
          f"(libyaml {'yes' if yaml.__with_libyaml__ else 'NO'})")
    print(f"each figure: a fresh process, median of {args.runs} (PyYAML at 100,000+: {args.peer_runs})")
    print(f"{'services':>9} {'format':>6} {'size':>8} {'load':>8} {'peak':>8} {'parse':>8} {'peak':>8} "
          f"{'PyYAML':>8} {'peak':>8}  parse vs PyYAML" + (f"  | load at {args.before}" if args.before else ""))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="pilotfish-cpbench-") as tmp:
        tree = source_tree(args.before, Path(tmp, "before")) if args.before else None
        for n in (int(x) for x in args.sizes.split(",")):
            document = mesh_document(n)
            files = {"yaml": Path(tmp, f"mesh-{n}.yaml"), "json": Path(tmp, f"mesh-{n}.json")}
            files["yaml"].write_text(yaml.dump(document, Dumper=yaml.CSafeDumper, sort_keys=False))
            files["json"].write_text(json.dumps(document))
            for fmt, path in files.items():
                row = {stage: measure(stage, path, n, fmt,
                                      args.peer_runs if stage == "pyyaml" and n >= 100_000 else args.runs)
                       for stage in STAGES}
                figures += row.values()
                load, parse, peer = row["load"], row["parse"], row["pyyaml"]
                line = (f"{n:>9} {fmt:>6} {path.stat().st_size / 1e6:>6.1f}MB "
                        f"{load['median_s']:>7.2f}s {load['peak_mib']:>6.0f}MB "
                        f"{parse['median_s']:>7.2f}s {parse['peak_mib']:>6.0f}MB "
                        f"{peer['median_s']:>7.2f}s {peer['peak_mib']:>6.0f}MB  "
                        f"{parse['median_s'] / peer['median_s']:.2f}x the time")
                if tree:
                    old = measure("load", path, n, fmt, args.peer_runs if n >= 100_000 else args.runs, tree)
                    figures.append({**old, "stage": f"load@{args.before}"})
                    line += (f"  | {old['median_s']:.2f}s {old['peak_mib']:.0f}MB "
                             f"(now {load['median_s'] / old['median_s']:.2f}x the time)")
                print(line, flush=True)
    write_report(args.json, {"figures": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
