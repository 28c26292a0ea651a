#!/usr/bin/env python3
"""`pilotfish init` benchmark: the time to apply the default sidecar capture rules, against
`iptables-nft-restore` / `iptables-legacy-restore --noflush` of exactly the same rules, measured in
the same run.

Run as `make bench` (after the DNS benchmark) or `.venv/bin/python bench/init_bench.py`. Needs root
(`ip netns`). What it does:

1. The configuration is the injector's default (docs/istio-compat.md "istio-iptables configuration"):
   `pilotfish init -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020
   --ipv6 off --iptables-backend nft|legacy`, plus two variants: `--redirect-dns --resolv-conf F`
   (nameserver 10.77.0.1) and `--ipv6 on`. For each, `pilotfish init ... --dry-run` gives the exact
   iptables-restore input per family; that text (without the `# ipv4` line) is the peer's input.
2. Every sample runs in a fresh network namespace (`ip netns add`, `ip netns exec`, `ip netns del`).
   Per round and per case (variant x backend), interleaved, alternating which side goes first:
   - `ip netns exec NS true`: the cost of `ip netns exec` itself, subtracted from both sides;
   - peer: `ip netns exec NS iptables-B-restore --noflush FILE` (and `ip6tables-B-restore` for the
     IPv6 family), minus that overhead once per call;
   - peer-py (a cross-check): the same restore call(s) spawned with subprocess.run by a Python
     process already inside the namespace, timed around the call;
   - pilotfish, whole command: `ip netns exec NS .venv/bin/pilotfish init ...` minus the overhead,
     i.e. what an init container waits for: interpreter start-up, imports, detection, apply, exit.
     Then the same command again in the same namespace (the rerun: nothing to change);
   - pilotfish, apply phase: a Python process inside the namespace imports pilotfish.init first,
     then times parse_args+validate, detect, plan, choose (the backend probe) and
     `run_tables(backend, plan, _canon)` (the apply: iptables-save, diff, apply); then the rerun
     (choose + run_tables again, which changes nothing). It also times the parts: each iptables
     subprocess, and for the legacy backend the xtables lock, the fork, `import iptc` in the child,
     the libiptc calls and commit, and the child's exit.
   After every apply the namespace's tables (iptables-save, counters and comments dropped) must be
   those the peer left; any difference is counted and printed.
3. Start-up: `pilotfish init --help` (interpreter + the imports of the init path, no work), the
   interpreter alone and a few imports, interleaved, plus one `python -X importtime` listing.

Python's compiled bytecode: an image built with pip has .pyc files for everything, but a checkout
run with PYTHONDONTWRITEBYTECODE=1 (as here) compiles pilotfish's own modules at every start. By
default every measured Python process therefore gets a bytecode cache in the work directory
(PYTHONPYCACHEPREFIX, filled by the warm-up; nothing is written to the repository), and the
start-up section also times `pilotfish init --help` with the environment as it is.
`--no-bytecode-cache` runs everything with the environment as it is.

Figures: median and p90 wall time per case; ratios are median(pilotfish) / median(peer).
`--json PATH` writes every raw sample. `--quick` is a smoke run (3 rounds, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, git_commit, med, pilotfish_exe, tool_version, write_report

PY = sys.executable

DEFAULT_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                "-b", "*", "-d", "15090,15021,15020"]
DNS_SERVER = "10.77.0.1"
TARGET_RATIO = 1.5  # the issue: "Target <= 1.5x the raw restore"

# variant -> extra flags (RESOLV is replaced by the resolv.conf path)
VARIANTS = {
    "default": ["--ipv6", "off"],
    "dns": ["--ipv6", "off", "--redirect-dns", "--resolv-conf", "RESOLV"],
    "ipv6": ["--ipv6", "on"],
}
BACKENDS = ("nft", "legacy")
FAMILY_TOOL = {4: "iptables", 6: "ip6tables"}


# --------------------------------------------------------------------------------------------
# Code run inside a namespace by a fresh interpreter (python -c CODE JSON).

WORKER = r'''
import json, sys, time
pc = time.perf_counter
spec = json.loads(sys.argv[1])
t_imp0 = pc()
import pilotfish.agent.cli  # what the `pilotfish` entry point imports first: iptc's import in the
                            # legacy child costs less when its dependencies are already loaded
from pilotfish.init.config import parse_args, validate
from pilotfish.init.detect import detect
from pilotfish.init.planner import plan
from pilotfish.init.backends import choose
from pilotfish.init.apply import run_tables
from pilotfish.init.command import _canon
from pilotfish.init import backends
from pilotfish.init.routespec import RouteSpec
t_imp1 = pc()

calls = []          # [phase, tool, seconds] for every iptables subprocess
phase = ["choose"]
def runner(argv, stdin=None):
    t = pc()
    done = backends.run(argv, stdin)
    calls.append([phase[0], argv[0], pc() - t])
    return done

# Legacy backend: time the parts of LegacyBackend.apply (lock, fork, child import, libiptc, exit).
legacy = []         # per family: {"enter", "fork", "back", "exit"} (parent) + child times
orig_in_child, orig_apply_legacy = backends.in_child, backends._apply_legacy
def in_child(action):
    legacy[-1]["fork"] = pc()
    orig_in_child(action)
    legacy[-1]["back"] = pc()
def apply_legacy(family, ops):  # runs in the child; its times go through a file
    # The real _apply_legacy runs unchanged; a wrapper of __import__ notes when `import iptc` starts
    # and ends (whatever _apply_legacy does before it, e.g. its library lookup set-up, comes first).
    import builtins
    t_child = pc()
    marks = {}
    real_import = builtins.__import__
    def traced_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "iptc" and level == 0 and "iptc" not in sys.modules:
            t = pc()
            module = real_import(name, globals, locals, fromlist, level)
            marks["import"] = [t, pc()]
            return module
        return real_import(name, globals, locals, fromlist, level)
    builtins.__import__ = traced_import
    try:
        orig_apply_legacy(family, ops)
    finally:
        builtins.__import__ = real_import
        t_done = pc()
        t_imp = marks.get("import", [t_child, t_child])
        with open(spec["timefile"], "a") as f:
            f.write(json.dumps({"child": t_child, "import_start": t_imp[0], "imported": t_imp[1],
                                "done": t_done}) + "\n")
backends.in_child, backends._apply_legacy = in_child, apply_legacy

def instrument(backend):
    orig = backend.apply
    def apply(family, ops):
        legacy.append({"family": family, "enter": pc()})
        orig(family, ops)
        legacy[-1]["exit"] = pc()
    backend.apply = apply
    return backend

out = {"imports_s": t_imp1 - t_imp0}
t0 = pc()
cfg, _ = parse_args(spec["argv"], {})
validate(cfg)
t1 = pc()
det = detect(cfg)
t2 = pc()
p = plan(cfg, det)
t3 = pc()
backend, why = choose(cfg.iptables_backend, p.families, runner)
t4 = pc()
instrument(backend)
phase[0] = "apply"
t5 = pc()
res = run_tables(backend, p, _canon)
t6 = pc()
out.update(parse_s=t1 - t0, detect_s=t2 - t1, plan_s=t3 - t2, choose_s=t4 - t3, apply_s=t6 - t5,
           backend=backend.name, changed=res.changed, changes=len(res.diff),
           families=list(p.families))
spec_r = RouteSpec(mark=int(cfg.inbound_tproxy_mark), table=int(cfg.inbound_tproxy_route_table),
                   families=p.families, tproxy=cfg.tproxy and bool(cfg.inbound_ports),
                   passthrough_v6=6 in p.families)
if not spec_r.satisfied():  # what `pilotfish init` does after the tables (::6 for IPv6)
    from pilotfish.init.command import _install_routes
    t7 = pc()
    _install_routes(spec_r)
    t8 = pc()
    out.update(routes_import_s=0.0, routes_install_s=t8 - t7)
legacy_first = legacy[:]
del legacy[:]
phase[0] = "rerun-choose"
t10 = pc()
backend2, _ = choose(cfg.iptables_backend, p.families, runner)
t11 = pc()
phase[0] = "rerun"
res2 = run_tables(instrument(backend2), p, _canon)
t12 = pc()
out.update(rerun_choose_s=t11 - t10, rerun_apply_s=t12 - t11, rerun_changed=res2.changed,
           calls=calls, legacy=legacy_first, legacy_rerun=legacy[:])
print(json.dumps(out))
'''

PEER_WORKER = r'''
import json, subprocess, sys, time
spec = json.loads(sys.argv[1])
total, rcs = 0.0, []
for argv in spec["cmds"]:
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    total += time.perf_counter() - t
    rcs.append([done.returncode, done.stderr.strip()])
print(json.dumps({"s": total, "rcs": rcs}))
'''


# --------------------------------------------------------------------------------------------
# Helpers




CHILD_ENV: dict[str, str] = dict(os.environ)  # the environment of every measured command


def bytecode_env(cache_dir: Path | None) -> dict[str, str]:
    """The children's environment: with `cache_dir`, Python caches compiled bytecode there (as an
    image built with pip would have it); without, the environment as it is."""
    env = dict(os.environ)
    if cache_dir is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    return env


def timed(argv: list[str], timeout: float = 60, env: dict[str, str] | None = None
          ) -> tuple[float, subprocess.CompletedProcess]:
    env = CHILD_ENV if env is None else env
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    return time.perf_counter() - t0, done


class Netns:
    """A fresh network namespace for one sample, deleted on exit."""

    counter = 0

    def __init__(self) -> None:
        Netns.counter += 1
        self.name = f"pfbench{os.getpid()}-{Netns.counter}"

    def __enter__(self) -> "Netns":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def exec(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


def cleanup_namespaces() -> None:
    prefix = f"pfbench{os.getpid()}-"
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def tables_state(ns: Netns, backend: str, families, tables: dict[int, set[str]]) -> str:
    """The tables the rules live in, as iptables-save prints them, without comments and counters."""
    out = []
    for fam in families:
        p = subprocess.run(ns.exec([f"{FAMILY_TOOL[fam]}-{backend}-save"]), capture_output=True, text=True)
        keep = False
        for line in p.stdout.splitlines():
            if line.startswith("#"):
                continue
            if line.startswith("*"):
                keep = line[1:].strip() in tables[fam]
                out.append(f"ipv{fam} {line}" if keep else "")
                continue
            if keep:
                out.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return "\n".join(x for x in out if x)


def legacy_table_names(ns: Netns, families) -> dict:
    """The legacy tables that exist in the namespace (a table exists once something touched it)."""
    out = {}
    for fam in families:
        path = "/proc/net/ip_tables_names" if fam == 4 else "/proc/net/ip6_tables_names"
        p = subprocess.run(ns.exec(["cat", path]), capture_output=True, text=True)
        out[f"ipv{fam}"] = sorted(p.stdout.split())
    return out




def p90(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) < 3:
        return xs[-1]
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


def ms(x, f="{:.1f}"):
    return "—" if x is None else f.format(x * 1e3)






# --------------------------------------------------------------------------------------------
# Cases


class Case:
    def __init__(self, variant: str, backend: str, resolv: Path, workdir: Path):
        self.variant, self.backend = variant, backend
        self.name = f"{variant}/{backend}"
        extra = [str(resolv) if a == "RESOLV" else a for a in VARIANTS[variant]]
        self.argv = DEFAULT_ARGS + extra + ["--iptables-backend", backend]
        self.cmdline = "pilotfish init " + " ".join(repr(a) if a in ("", "*") else a for a in self.argv)
        # The exact restore input, from --dry-run (the same for both backends).
        p = subprocess.run([pilotfish_exe(), "init", *self.argv, "--dry-run"], capture_output=True, text=True,
                           env=CHILD_ENV)
        if p.returncode != 0:
            raise RuntimeError(f"{self.name}: --dry-run failed ({p.returncode}): {p.stderr}")
        self.texts: dict[int, str] = {}
        fam = None
        for line in p.stdout.splitlines(keepends=True):
            m = re.match(r"# ipv([46])$", line.strip())
            if m:
                fam = int(m.group(1))
                self.texts[fam] = ""
            elif fam is not None:
                self.texts[fam] += line
        self.families = sorted(self.texts)
        self.tables = {f: set(re.findall(r"^\*(\S+)", t, re.M)) for f, t in self.texts.items()}
        self.files = {}
        for f, text in self.texts.items():
            path = workdir / f"{variant}.ipv{f}.rules"
            path.write_text(text)
            self.files[f] = path
        self.rule_lines = {f: sum(1 for l in t.splitlines() if l.startswith(("-A", "-I", "-N")))
                           for f, t in self.texts.items()}
        self.peer_cmds = [[f"{FAMILY_TOOL[f]}-{backend}-restore", "--noflush", str(self.files[f])]
                          for f in self.families]
        self.samples: dict[str, list] = {k: [] for k in
                                         ("true", "peer", "peer_py", "whole", "whole_rerun", "inproc")}
        self.reference_state: str | None = None
        self.mismatches: list[str] = []
        self.retries = 0
        self.legacy_tables: dict[str, dict] = {}  # who -> {family: legacy tables present}
        self.errors: list[str] = []


LOCK_MSG = "xtables lock"


def run_sample(case: Case, kind: str, pf: str) -> None:
    """One sample of one kind, in a fresh namespace (retried up to 3 times if another process held
    the xtables lock: only the peer's legacy restore fails on it instead of waiting)."""
    for attempt in range(3):
        try:
            _run_sample(case, kind, pf)
            return
        except LockBusy as err:
            case.retries += 1
            last = err
            time.sleep(0.05)
    case.errors.append(f"{kind}: {last}")


class LockBusy(Exception):
    pass


def _check_state(case: Case, ns: Netns, who: str) -> None:
    if case.backend == "legacy" and who not in case.legacy_tables:
        case.legacy_tables[who] = legacy_table_names(ns, case.families)
    state = tables_state(ns, case.backend, case.families, case.tables)
    if case.reference_state is None:
        return
    if state != case.reference_state:
        import difflib
        diff = "\n".join(difflib.unified_diff(case.reference_state.splitlines(), state.splitlines(),
                                              "peer", who, lineterm="", n=0))
        case.mismatches.append(f"{who}:\n{diff}")


def _run_sample(case: Case, kind: str, pf: str) -> None:
    with Netns() as ns:
        if kind == "true":
            dt, p = timed(ns.exec(["true"]))
            case.samples["true"].append(dt)
        elif kind == "peer":
            total = 0.0
            for cmd in case.peer_cmds:
                dt, p = timed(ns.exec(cmd))
                if p.returncode != 0:
                    if LOCK_MSG in p.stderr:
                        raise LockBusy(p.stderr.strip())
                    raise RuntimeError(f"{case.name} peer {cmd[0]} failed ({p.returncode}): {p.stderr.strip()}")
                total += dt
            case.samples["peer"].append(total)
            if case.backend == "legacy" and "peer" not in case.legacy_tables:
                case.legacy_tables["peer"] = legacy_table_names(ns, case.families)
            state = tables_state(ns, case.backend, case.families, case.tables)
            if case.reference_state is None:
                case.reference_state = state
            elif state != case.reference_state:
                case.mismatches.append("peer: a different state from the first peer run")
        elif kind == "peer_py":
            dt, p = timed(ns.exec([PY, "-c", PEER_WORKER, json.dumps({"cmds": case.peer_cmds})]))
            if p.returncode != 0:
                raise RuntimeError(f"{case.name} peer_py failed: {p.stderr}")
            r = json.loads(p.stdout)
            for rc, err in r["rcs"]:
                if rc != 0:
                    if LOCK_MSG in err:
                        raise LockBusy(err)
                    raise RuntimeError(f"{case.name} peer_py restore failed ({rc}): {err}")
            case.samples["peer_py"].append(r["s"])
        elif kind == "whole":
            cmd = ns.exec([pf, "init", *case.argv])
            dt, p = timed(cmd)
            if p.returncode != 0 or "rules installed" not in p.stderr:
                raise RuntimeError(f"{case.name}: pilotfish init exited {p.returncode}: {p.stderr.strip()}")
            dt2, p2 = timed(cmd)
            if p2.returncode != 0 or "nothing to do" not in p2.stderr:
                raise RuntimeError(f"{case.name}: pilotfish init (rerun) exited {p2.returncode}, "
                                   f"not 'nothing to do': {p2.stderr.strip()}")
            case.samples["whole"].append(dt)
            case.samples["whole_rerun"].append(dt2)
            _check_state(case, ns, "pilotfish init (whole command)")
        elif kind == "inproc":
            fd, timefile = tempfile.mkstemp(prefix="pfbench-legacy-", suffix=".jsonl")
            os.close(fd)
            try:
                spec = {"argv": case.argv, "timefile": timefile}
                dt, p = timed(ns.exec([PY, "-c", WORKER, json.dumps(spec)]))
                if p.returncode != 0:
                    raise RuntimeError(f"{case.name}: in-process worker failed ({p.returncode}):\n{p.stderr}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r["process_wall_s"] = dt
                r["child"] = [json.loads(l) for l in Path(timefile).read_text().splitlines() if l]
            finally:
                os.unlink(timefile)
            if not r["changed"] or r["rerun_changed"]:
                raise RuntimeError(f"{case.name}: in-process apply changed={r['changed']}, "
                                   f"rerun changed={r['rerun_changed']}")
            case.samples["inproc"].append(r)
            _check_state(case, ns, "pilotfish in-process apply")


def legacy_parts(r: dict) -> dict | None:
    """The parts of LegacyBackend.apply in one in-process sample, summed over families."""
    fams = r.get("legacy") or []
    child = r.get("child") or []
    if not fams or len(child) != len(fams):
        return None
    parts = {"lock_s": 0.0, "fork_to_child_s": 0.0, "before_import_s": 0.0, "import_iptc_s": 0.0,
             "libiptc_s": 0.0, "child_exit_s": 0.0, "total_s": 0.0}
    for f, c in zip(fams, child):
        parts["lock_s"] += f["fork"] - f["enter"]
        parts["fork_to_child_s"] += c["child"] - f["fork"]
        parts["before_import_s"] += c["import_start"] - c["child"]
        parts["import_iptc_s"] += c["imported"] - c["import_start"]
        parts["libiptc_s"] += c["done"] - c["imported"]
        parts["child_exit_s"] += f["back"] - c["done"]
        parts["total_s"] += f["exit"] - f["enter"]
    return parts


def call_sum(r: dict, phase: str, tool_suffix: str | None = None) -> float:
    return sum(s for ph, tool, s in r["calls"] if ph == phase and (tool_suffix is None or tool.endswith(tool_suffix)))


# --------------------------------------------------------------------------------------------
# Start-up


def startup_section(pf: str, rounds: int) -> dict:
    as_is = dict(os.environ)
    as_is.pop("PYTHONPYCACHEPREFIX", None)
    cached = "PYTHONPYCACHEPREFIX" in CHILD_ENV
    pycache = (REPO / "init" / "__pycache__").is_dir()
    no_cache_label = ("pilotfish init --help, no bytecode cache (environment as is)"
                      if os.environ.get("PYTHONDONTWRITEBYTECODE") and not pycache
                      else "pilotfish init --help, environment as is")
    cmds = {
        "python -c pass (interpreter + site)": [PY, "-c", "pass"],
        "python -c 'import pilotfish.init.command'": [PY, "-c", "import pilotfish.init.command"],
        "python -c 'import pilotfish.agent.cli, pilotfish.init.command'":
            [PY, "-c", "import pilotfish.agent.cli, pilotfish.init.command"],
        "pilotfish init --help (start-up + imports, no work)": [pf, "init", "--help"],
        no_cache_label: ([pf, "init", "--help"], as_is),
        "python -c 'from pyroute2 import IPRoute' (TPROXY mode only)": [PY, "-c", "from pyroute2 import IPRoute"],
    }
    if not cached or as_is == CHILD_ENV:
        cmds.pop(no_cache_label)
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(rounds):
        for k, argv in cmds.items():
            argv, env = argv if isinstance(argv, tuple) else (argv, None)
            dt, p = timed(argv, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"{k} failed: {p.stderr}")
            samples[k].append(dt)
    # One -X importtime listing of what `pilotfish init` imports (cumulative, top-level packages).
    p = subprocess.run([PY, "-X", "importtime", "-c",
                        "import pilotfish.agent.cli, pilotfish.init.command"],
                       capture_output=True, text=True, env=CHILD_ENV)
    rows = []
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)))
    top = sorted((r for r in rows if r[2] <= 3), key=lambda r: -r[1])[:12]
    total_us = sum(r[1] for r in rows if r[2] == 1)
    return {"samples": samples, "importtime_top": [
        {"module": r[3], "self_us": r[0], "cumulative_us": r[1], "depth": (r[2] - 1) // 2} for r in top],
        "importtime_total_us": total_us}


# --------------------------------------------------------------------------------------------
# Main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the raw figures as JSON")
    ap.add_argument("--rounds", type=int, default=30, help="samples per case and kind (default 30)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants (default,dns,ipv6)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="backends (nft,legacy)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="run Python as the environment says (by default a bytecode cache in the work "
                         "directory, PYTHONPYCACHEPREFIX, is used and PYTHONDONTWRITEBYTECODE dropped)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 3
    if os.geteuid() != 0:
        print("init_bench needs root (ip netns)", file=sys.stderr)
        return 2
    for tool in ("ip", "iptables-nft-restore", "iptables-legacy-restore"):
        if not shutil.which(tool):
            print(f"{tool} not found: run `make bench` (installs iptables, iproute2)", file=sys.stderr)
            return 2

    pf = pilotfish_exe()
    t_start = time.perf_counter()
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "pilotfish_commit": git_commit("init", "agent", "dns"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "iptables": tool_version(["iptables-legacy", "--version"], r"v(\S+)"),
                    "loadavg_start": os.getloadavg()},
        "settings": {"rounds": args.rounds, "variants": args.variants, "backends": args.backends},
    }
    print(f"pilotfish init benchmark  {report['date']}  commit {report['pilotfish_commit']}  "
          f"{os.cpu_count()} CPUs  iptables {report['machine']['iptables']}  "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-initbench-"))
    global CHILD_ENV
    CHILD_ENV = bytecode_env(None if args.no_bytecode_cache else workdir / "pycache")
    report["settings"]["bytecode_cache"] = not args.no_bytecode_cache
    report["settings"]["env_PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE")
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {DNS_SERVER}\n")
    cases = [Case(v, b, resolv, workdir) for v in args.variants.split(",") if v
             for b in args.backends.split(",") if b]
    for v in dict.fromkeys(c.variant for c in cases):
        c = next(c for c in cases if c.variant == v)
        print(f"  {v:<8} {c.cmdline.replace(' --iptables-backend ' + c.backend, ' --iptables-backend nft|legacy')}")
        print(f"  {'':<8} rules: " + ", ".join(f"ipv{f} {c.rule_lines[f]} lines (-N/-A) in "
                                                  f"{'+'.join(sorted(c.tables[f]))}" for f in c.families))

    peer_first = ["true", "peer", "peer_py"]
    pf_first = ["whole", "inproc"]
    ok = True
    try:
        # One unrecorded warm-up of each kind (page cache, module loading), then the rounds.
        for case in cases:
            for kind in ["peer"] + pf_first + ["true", "peer_py"]:
                run_sample(case, kind, pf)
            for k in case.samples:
                case.samples[k].clear()
        for rd in range(args.rounds):
            for case in cases:
                order = peer_first + pf_first if rd % 2 == 0 else pf_first + peer_first
                for kind in order:
                    run_sample(case, kind, pf)
            if rd % 5 == 4 or rd == args.rounds - 1:
                print(f"  round {rd + 1}/{args.rounds}  ({time.perf_counter() - t_start:.0f} s)", flush=True)
        startup = startup_section(pf, max(5, args.rounds // 2))
    finally:
        cleanup_namespaces()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    overhead = med([x for c in cases for x in c.samples["true"]]) or 0.0
    report["netns_exec_true_s"] = {"median": overhead, "p90": p90([x for c in cases for x in c.samples["true"]])}
    print(f"\n`ip netns exec NS true`: median {ms(overhead, '{:.2f}')} ms, p90 "
          f"{ms(report['netns_exec_true_s']['p90'], '{:.2f}')} ms (subtracted from the peer once per restore "
          f"call and from the whole command)")

    results: dict[str, dict[str, Any]] = {}
    for c in cases:
        n_calls = len(c.peer_cmds)
        peer = [x - n_calls * overhead for x in c.samples["peer"]]
        whole = [x - overhead for x in c.samples["whole"]]
        rerun = [x - overhead for x in c.samples["whole_rerun"]]
        ip = c.samples["inproc"]
        g = lambda k: [r.get(k) for r in ip]  # noqa: E731
        apply_ = g("apply_s")
        probe_apply = [r["choose_s"] + r["apply_s"] for r in ip]
        res: dict[str, Any] = {
            "cmdline": c.cmdline, "families": c.families, "rule_lines": c.rule_lines,
            "peer_cmds": c.peer_cmds,
            "peer_s": peer, "peer_py_s": c.samples["peer_py"], "whole_s": whole, "whole_rerun_s": rerun,
            "inproc": ip, "netns_true_s": c.samples["true"],
            "mismatches": c.mismatches, "lock_retries": c.retries, "errors": c.errors,
            "legacy_tables_after": c.legacy_tables,
        }
        m: dict[str, Any] = {k: med(v) for k, v in (("peer", peer), ("peer_py", c.samples["peer_py"]), ("whole", whole),
                                     ("rerun", rerun), ("apply", apply_), ("probe_apply", probe_apply))}
        res["median_s"] = m
        res["p90_s"] = {k: p90(v) for k, v in (("peer", peer), ("peer_py", c.samples["peer_py"]), ("whole", whole),
                                                ("rerun", rerun), ("apply", apply_), ("probe_apply", probe_apply))}
        res["ratios"] = {
            "whole_vs_peer": m["whole"] / m["peer"] if m["peer"] else None,
            "apply_vs_peer": m["apply"] / m["peer"] if m["peer"] else None,
            "probe_apply_vs_peer": m["probe_apply"] / m["peer"] if m["peer"] else None,
            "apply_vs_peer_py": m["apply"] / m["peer_py"] if m["peer_py"] else None,
        }
        # Parts of the in-process run.
        parts: dict[str, Any] = {k: med(g(k)) for k in ("imports_s", "parse_s", "detect_s", "plan_s", "choose_s", "apply_s",
                                        "rerun_choose_s", "rerun_apply_s", "routes_import_s",
                                        "routes_install_s", "process_wall_s")}
        parts["apply_save_subprocess_s"] = med([call_sum(r, "apply", "-save") for r in ip])
        parts["apply_restore_subprocess_s"] = med([call_sum(r, "apply", "-restore") for r in ip])
        parts["apply_python_s"] = med([r["apply_s"] - call_sum(r, "apply") for r in ip]) if c.backend == "nft" else None
        parts["choose_subprocess_s"] = med([call_sum(r, "choose") for r in ip])
        parts["rerun_subprocess_s"] = med([call_sum(r, "rerun") + call_sum(r, "rerun-choose") for r in ip])
        lp = [x for x in (legacy_parts(r) for r in ip) if x]
        if lp:
            parts["legacy"] = {k: med([x[k] for x in lp]) for k in lp[0]}
        res["parts_median_s"] = parts
        results[c.name] = res
        if c.mismatches or c.errors:
            ok = False

    report["cases"] = results
    report["startup"] = startup

    # ---- print
    print(f"\nWall time per apply, each sample in a fresh namespace, {args.rounds} samples per figure "
          f"(median / p90, ms). 'whole' and 'peer' are net of `ip netns exec`.")
    hdr = (f"  {'case':<15}{'peer restore':>15}{'peer-py':>14}{'pf whole cmd':>16}{'pf apply':>14}"
           f"{'pf rerun cmd':>16}{'pf rerun apply':>16}")
    print(hdr)
    for name, r in results.items():
        m, q = r["median_s"], r["p90_s"]
        rr = [x["rerun_apply_s"] for x in r["inproc"]]
        print(f"  {name:<15}{ms(m['peer'], '{:.2f}'):>8} / {ms(q['peer'], '{:.2f}'):<5}"
              f"{ms(m['peer_py'], '{:.2f}'):>7} / {ms(q['peer_py'], '{:.2f}'):<5}"
              f"{ms(m['whole']):>8} / {ms(q['whole']):<6}"
              f"{ms(m['apply'], '{:.2f}'):>6} / {ms(q['apply'], '{:.2f}'):<6}"
              f"{ms(m['rerun']):>8} / {ms(q['rerun']):<6}"
              f"{ms(med(rr), '{:.2f}'):>7} / {ms(p90(rr), '{:.2f}'):<6}")
    print("  peer: `ip netns exec NS iptables-B-restore --noflush FILE` (+ ip6tables-B-restore for ipv6);")
    print("  peer-py: the same restore(s) spawned by Python inside the namespace; pf apply: run_tables()")
    print("  in-process (iptables-save + diff + apply), after import, parse, detect, plan, choose.")

    print(f"\nRatios pilotfish / peer (medians; target <= {TARGET_RATIO}x the raw restore):")
    print(f"  {'case':<15}{'whole cmd':>11}{'apply':>9}{'probe+apply':>13}{'apply/peer-py':>15}")
    for name, r in results.items():
        rt = r["ratios"]
        f = lambda x: "—" if x is None else f"{x:.1f}x"  # noqa: E731
        print(f"  {name:<15}{f(rt['whole_vs_peer']):>11}{f(rt['apply_vs_peer']):>9}"
              f"{f(rt['probe_apply_vs_peer']):>13}{f(rt['apply_vs_peer_py']):>15}")
    targets = {}
    for name, r in results.items():
        for k in ("whole_vs_peer", "apply_vs_peer"):
            x = r["ratios"][k]
            targets[f"{name} {k}"] = x is not None and x <= TARGET_RATIO
    report["targets"] = targets
    met = [k for k, v in targets.items() if v]
    print(f"  target met by: {', '.join(met) if met else 'none'}")

    print("\nWhere the in-process time goes (medians, ms):")
    print(f"  {'case':<15}{'imports':>8}{'parse':>7}{'detect':>7}{'plan':>6}{'choose':>7}{'apply':>7}"
          f"{'=save':>7}{'+restore':>9}{'+python':>8}{'rerun':>7}{'routes':>8}")
    for name, r in results.items():
        pt = r["parts_median_s"]
        sv, rs = pt["apply_save_subprocess_s"], pt["apply_restore_subprocess_s"]
        py_part = pt["apply_python_s"]
        routes = (pt["routes_import_s"] + pt["routes_install_s"]) if pt["routes_import_s"] is not None else None
        print(f"  {name:<15}{ms(pt['imports_s']):>8}{ms(pt['parse_s'], '{:.2f}'):>7}{ms(pt['detect_s'], '{:.2f}'):>7}"
              f"{ms(pt['plan_s'], '{:.2f}'):>6}{ms(pt['choose_s'], '{:.2f}'):>7}{ms(pt['apply_s'], '{:.2f}'):>7}"
              f"{ms(sv, '{:.2f}'):>7}{(ms(rs, '{:.2f}') if 'legacy' not in pt else '(child)'):>9}"
              f"{ms(py_part, '{:.2f}'):>8}{ms(pt['rerun_apply_s'], '{:.2f}'):>7}{ms(routes):>8}")
    print("  apply = save (the iptables-save subprocess) + restore (nft: the iptables-nft-restore subprocess)")
    print("  + python (parsing, diff; per sample, then the median). routes: --ipv6 on only: ::6 on lo with an")
    print("  ioctl (as `pilotfish init` does after the tables; not in 'apply'; pyroute2 only for TPROXY).")
    leg = {n: r["parts_median_s"]["legacy"] for n, r in results.items() if "legacy" in r["parts_median_s"]}
    if leg:
        print("\n  legacy backend's apply, per run (summed over families; medians, ms):")
        print(f"  {'case':<15}{'save':>7}{'lock':>7}{'fork':>7}{'pre-import':>11}{'import iptc':>12}"
              f"{'libiptc':>9}{'child exit':>11}{'backend.apply':>14}")
        for n, lp in leg.items():
            sv = results[n]["parts_median_s"]["apply_save_subprocess_s"]
            print(f"  {n:<15}{ms(sv, '{:.2f}'):>7}{ms(lp['lock_s'], '{:.2f}'):>7}{ms(lp['fork_to_child_s'], '{:.2f}'):>7}"
                  f"{ms(lp['before_import_s'], '{:.2f}'):>11}{ms(lp['import_iptc_s']):>12}{ms(lp['libiptc_s']):>9}"
                  f"{ms(lp['child_exit_s'], '{:.2f}'):>11}{ms(lp['total_s']):>14}")
        print("  (fork: from the fork to the child running; pre-import: what _apply_legacy does before")
        print("   `import iptc`; libiptc: the ops and commit of every table; child exit: the child's last")
        print("   write to the time file, its exit and the parent's wake-up; a child per family)")

    help_key = "pilotfish init --help (start-up + imports, no work)"
    start = med(startup["samples"][help_key])
    print(f"\nThe whole command, decomposed (medians, ms): start-up = `{help_key.split(' (')[0]}` "
          f"({ms(start)} ms, measured below);")
    print("  phases = parse+detect+plan+choose+apply (+ ::6 for ipv6), in-process; rest = the remainder")
    print("  (logging set-up, the imports the worker does not need, interpreter exit, run-to-run noise).")
    print(f"  {'case':<15}{'whole':>8}{'start-up':>10}{'phases':>8}{'rest':>7}   {'rerun':>7}")
    for name, r in results.items():
        pt = r["parts_median_s"]
        phases = sum(pt[k] for k in ("parse_s", "detect_s", "plan_s", "choose_s", "apply_s"))
        if pt["routes_import_s"] is not None:
            phases += pt["routes_import_s"] + pt["routes_install_s"]
        whole = r["median_s"]["whole"]
        r["whole_decomposed_s"] = {"startup": start, "phases": phases, "rest": whole - start - phases}
        print(f"  {name:<15}{ms(whole):>8}{ms(start):>10}{ms(phases):>8}{ms(whole - start - phases):>7}"
              f"   {ms(r['median_s']['rerun']):>7}")

    print(f"\nStart-up (no namespace; {len(next(iter(startup['samples'].values())))} samples each, median / p90 ms):")
    for k, v in startup["samples"].items():
        print(f"  {k:<64}{ms(med(v)):>7} / {ms(p90(v))}")
    print(f"  python -X importtime, `import pilotfish.agent.cli, pilotfish.init.command` "
          f"(cumulative; importtime inflates): total {startup['importtime_total_us'] / 1e3:.1f} ms")
    print(f"    {'module':<40}{'level':>6}{'cumulative':>12}{'self':>8}")
    for row in startup["importtime_top"]:
        print(f"    {row['module']:<40}{row['depth']:>6}{row['cumulative_us'] / 1e3:>9.1f} ms"
              f"{row['self_us'] / 1e3:>5.1f} ms")

    for name, r in results.items():
        if r["mismatches"]:
            print(f"\nSTATE MISMATCHES in {name} ({len(r['mismatches'])}), first:\n{r['mismatches'][0]}")
        if r["errors"]:
            print(f"\nERRORS in {name}: {r['errors'][:3]}")
        if r["lock_retries"]:
            print(f"  {name}: {r['lock_retries']} samples retried (xtables lock held by another process)")
    for name, r in results.items():
        lt = r["legacy_tables_after"]
        if lt and len({json.dumps(v, sort_keys=True) for v in lt.values()}) > 1:
            print(f"\nlegacy tables that exist after the apply ({name}):")
            for who, v in lt.items():
                print(f"  {who:<34}{v}")
    if all(not r["mismatches"] for r in results.values()):
        print("\nstate check: after every pilotfish apply, the namespace's tables equal the peer's "
              "(iptables-save, counters dropped)")

    report["machine"]["loadavg_end"] = os.getloadavg()
    report["elapsed_s"] = time.perf_counter() - t_start
    print(f"\nelapsed {report['elapsed_s']:.0f} s  load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    write_report(args.json, report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
