"""The two iptables backends, and the choice between them.

- nft: one `iptables-nft-restore --noflush` (`ip6tables-nft-restore`) call per family.
- legacy: python-iptables (libiptc), one commit per table, under the xtables lock that the
  iptables binaries take (`/run/xtables.lock`).

Both read the live state with their `-save` binary, and both roll back by restoring the saved
tables whole (`-restore` without `--noflush` replaces each table it is given in one commit). A
table the snapshot did not have is deleted again with nft; legacy cannot delete a table (the
kernel creates one on first use), so there it is emptied, and the legacy apply builds and checks
every rule before it opens (and so creates) any table.

The choice (Istio's: docs/istio-compat.md "istio-iptables rules"; here done once for both
families so they never mix): the backend that
already holds rules in this namespace; if both do, the one holding the sidecar's chains (else
legacy, as istio-iptables); if neither, nft when the kernel has it. Unlike istio-iptables, the
probe writes nothing: a legacy table that merely exists (which istio-iptables' own probe rule
creates) does not count as rules.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .nslock import LOCK_WAIT, LockError, flock_wait
from .rules import V4, Rule
from .restore import BUILTIN_TARGETS, parse_save
from .ruleargs import parse_rule_args
from .state import OUR_CHAINS, Op, OpKind

log = logging.getLogger("pilotfish.init")

XTABLES_LOCK = "/run/xtables.lock"
# The built-in chains of each legacy table, for emptying a table the snapshot did not have.
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
# Option abbreviations the iptables command accepts (getopt prefixes) and Istio uses, which
# python-iptables' exact lookup does not: Istio writes the UDP DNS redirect with --to-port.
ABBREVIATIONS = {"to-port": "to-ports"}


class BackendError(RuntimeError):
    """A backend cannot be used, or a change could not be applied; the message says why."""


Runner = Callable[[list[str], str | None], subprocess.CompletedProcess[str]]


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output (the default Runner)."""
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)


def _tool(family: int, backend: str, suffix: str = "") -> str:
    return f"{'iptables' if family == V4 else 'ip6tables'}-{backend}{suffix}"


class Backend(abc.ABC):
    """Reads and writes one backend's tables in the current network namespace."""

    name = ""

    def __init__(self, runner: Runner = run, saved: dict[int, str] | None = None) -> None:
        self.runner = runner
        self._saved = dict(saved or {})  # dumps the probe just took, used once

    def save(self, family: int) -> str:
        if family in self._saved:
            return self._saved.pop(family)
        done = self.runner([_tool(family, self.name, "-save")], None)
        if done.returncode != 0:
            raise BackendError(f"{_tool(family, self.name, '-save')} failed: {done.stderr.strip()}")
        return done.stdout

    @abc.abstractmethod
    def apply(self, family: int, ops: dict[str, list[Op]]) -> None:
        """Apply the ops of one family; raise BackendError if the kernel refuses them."""

    removes_tables = True  # whether restoring absent_table() takes the table away

    @abc.abstractmethod
    def absent_table(self, table: str) -> str:
        """Restore input for a table the snapshot did not have: as near to none as can be."""

    def restore_tables(self, family: int, text: str) -> None:
        """Replace the tables in `text` (iptables-save output) whole, each in one commit."""
        tool = _tool(family, self.name, "-restore")
        done = self.runner([tool], text)
        if done.returncode != 0:
            raise BackendError(f"{tool} failed: {done.stderr.strip()}")


class NftBackend(Backend):
    name = "nft"

    def absent_table(self, table: str) -> str:
        return f"*{table}\nCOMMIT\n"  # without --noflush, iptables-nft-restore deletes the table

    def apply(self, family: int, ops: dict[str, list[Op]]) -> None:
        text = "".join(
            f"*{table}\n" + "".join(op.restore_line() + "\n" for op in table_ops) + "COMMIT\n"
            for table, table_ops in ops.items() if table_ops
        )
        if not text:
            return
        tool = _tool(family, "nft", "-restore")
        done = self.runner([tool, "--noflush"], text)
        if done.returncode != 0:
            raise BackendError(f"{tool} --noflush failed: {done.stderr.strip()}")


class LegacyBackend(Backend):
    name = "legacy"
    # The kernel creates a legacy table the first time it is used in a namespace and has no call
    # to remove it: the best a rollback can do is leave it empty.
    removes_tables = False

    def absent_table(self, table: str) -> str:
        chains = "".join(f":{c} ACCEPT [0:0]\n" for c in BUILTIN_CHAINS[table])
        return f"*{table}\n{chains}COMMIT\n"

    def apply(self, family: int, ops: dict[str, list[Op]]) -> None:
        # Each family in its own child process: libxtables registers an extension such as TPROXY
        # once per process, and loading it for the second family makes it exit the process
        # ("target already registered"). The parent never loads python-iptables.
        with xtables_lock():
            in_child(lambda: _apply_legacy(family, ops))


def _apply_legacy(family: int, ops: dict[str, list[Op]]) -> None:
    _fast_iptc_import()
    import iptc  # loads libiptc and libxtables

    rule_class = _scoped_rule_class(iptc.Rule if family == V4 else iptc.Rule6)
    errors = (iptc.IPTCError, iptc.xtables.XTablesError, ValueError)
    # Every rule is built and checked by its extensions before any table is opened: opening a
    # legacy table creates it in the namespace for good, so whatever iptables refuses in a rule
    # must show before that.
    built: dict[int, Any] = {}
    for table_name, table_ops in ops.items():
        try:
            for op in table_ops:
                if op.rule is not None:
                    built[id(op)] = iptc_rule(rule_class, _OurChains(), op.rule)
                    built[id(op)].final_check()
        except errors as err:
            raise BackendError(f"{table_name} table: {err}") from None
    for table_name, table_ops in ops.items():
        if not table_ops:
            continue
        table = (iptc.Table if family == V4 else iptc.Table6)(table_name)
        table.autocommit = False
        try:
            for op in table_ops:
                _apply_iptc(iptc, table, op, built.get(id(op)))
            table.commit()
        except errors as err:
            raise BackendError(f"{table_name} table: {err}") from None


class _OurChains:
    """What python-iptables asks a rule's table while the rule is built: whether a jump target is
    a chain (ours are the only chains our rules jump to). Stands in for a table not opened yet."""

    @staticmethod
    def is_chain(name: str) -> bool:
        return name in OUR_CHAINS


def _scoped_rule_class(base: type) -> type:
    """python-iptables looks a jump target up in every table of the family, which creates each
    legacy table in the namespace (with its netfilter hooks). Our jumps stay within a table."""

    class ScopedRule(base):  # type: ignore[misc, valid-type]
        table: Any = None
        tables = property(lambda self: [self.table])

    return ScopedRule


def _fast_iptc_import() -> None:
    """Make importing python-iptables cheap; only ever called in the forked legacy child.

    - its library lookup goes through ctypes.util.find_library, which runs ldconfig, gcc and ld
      for every name (0.2 s here, and a slim image has no gcc): look in the library directories;
    - it imports distutils.sysconfig only for a fallback path, which setuptools' distutils shim
      makes cost ~40 ms: let that import fail, so it uses sysconfig;
    - without XTABLES_LIBDIR it asks `ldconfig -v` where the extensions are.
    """
    import ctypes.util
    import glob
    import sys
    import sysconfig

    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/lib64", "/usr/lib", "/lib"]
    sys.modules.setdefault("distutils.sysconfig", None)  # type: ignore[arg-type]
    for directory in dirs:
        if os.path.isdir(f"{directory}/xtables"):
            os.environ.setdefault("XTABLES_LIBDIR", f"{directory}/xtables")
            break

    def find_library(name: str) -> str | None:
        for directory in dirs:  # a versioned file: the bare .so may be a linker script
            found = sorted(glob.glob(f"{directory}/lib{name}.so.[0-9]*"))
            if found:
                return found[0]
        return None  # python-iptables then tries its own paths (its xtwrapper helper)

    ctypes.util.find_library = find_library


def in_child(action: Callable[[], None]) -> None:
    """Run `action` in a forked child; its exception comes back as a BackendError."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe and leave without cleanup handlers
        os.close(read_end)
        message = b""
        try:
            action()
        except BaseException as err:  # noqa: BLE001 - everything must reach the parent
            message = (str(err) or type(err).__name__).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    if message:
        raise BackendError(message.decode(errors="replace"))
    if status != 0:
        raise BackendError(f"python-iptables exited the process with status {os.waitstatus_to_exitcode(status)}")


def _apply_iptc(iptc: Any, table: Any, op: Op, rule: Any) -> None:
    if op.kind is OpKind.DELETE:
        # By number, as `iptables -D CHAIN N` does: reading the rule back first (Chain.rules) makes
        # python-iptables open every table of the family to classify its target, which creates
        # the ones missing (a legacy `security` table appeared after a reconcile).
        if not table._iptc.iptc_delete_num_entry(op.chain.encode(), op.index - 1, table._handle):
            raise iptc.IPTCError(f"can't delete rule {op.index} of {op.chain}: {table.strerror()}")
    elif op.kind is OpKind.FLUSH:
        iptc.Chain(table, op.chain).flush()
    elif op.kind is OpKind.DELETE_CHAIN:
        table.delete_chain(op.chain)
    elif op.kind is OpKind.NEW_CHAIN:
        table.create_chain(op.chain)
    else:
        assert op.rule is not None
        chain = iptc.Chain(table, op.chain)
        if op.rule.insert is None:
            chain.append_rule(rule)
        else:
            chain.insert_rule(rule, position=op.rule.insert - 1)


def iptc_rule(rule_class: type, table: Any, rule: Rule) -> Any:
    """A python-iptables rule from iptables arguments. Options go to the extension's own parser
    (the same code the iptables command runs), so any match or target works."""
    parsed = parse_rule_args(rule.args)
    out = rule_class()
    out.table = table
    attributes = {"-s": "src", "-d": "dst", "-i": "in_interface", "-o": "out_interface", "-p": "protocol"}
    for field, (text, inverted) in parsed.base.items():
        setattr(out, attributes[field], ("!" if inverted else "") + text)
    modules = parsed.matches + ([parsed.target] if parsed.target is not None else [])
    for module in modules:
        # Options are set before the next module is created: python-iptables checks a match
        # when the next one arrives, and an owner match without options fails that check.
        is_target = module is parsed.target
        created = out.create_target(module.name) if is_target else out.create_match(module.name)
        for option, value, negated in module.options:
            option = ABBREVIATIONS.get(option, option)
            if value is None:  # a flag such as CONNMARK --save-mark
                created.set_parameter(option)
            else:
                created.set_parameter(option, ("!" if negated else "") + value)
    return out


@contextlib.contextmanager
def xtables_lock(path: str = XTABLES_LOCK, wait: float = LOCK_WAIT) -> Iterator[None]:
    """The lock the legacy iptables tools take, so their writes never interleave with ours."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        log.warning("init: cannot open %s (%s); applying without the xtables lock", path, err.strerror)
        yield
        return
    try:
        try:
            flock_wait(fd, path, wait)
        except LockError as err:
            raise BackendError(str(err)) from None
        yield
    finally:
        os.close(fd)


BACKENDS: dict[str, type[Backend]] = {"legacy": LegacyBackend, "nft": NftBackend}


@dataclass(frozen=True)
class Evidence:
    """What the probe found for one backend (over the families in use)."""

    usable: bool
    why_not: str = ""
    rules: int = 0  # rule lines and user chains in its tables
    sidecar_chains: bool = False
    saved: dict[int, str] | None = None  # the dumps read, per family


def decide(requested: str, legacy: Evidence, nft: Evidence) -> tuple[str, str]:
    """(backend, reason). Pure."""
    found = {"legacy": legacy, "nft": nft}
    if requested in found:
        if not found[requested].usable:
            raise BackendError(f"--iptables-backend {requested}: not usable here: {found[requested].why_not}")
        return requested, f"requested with --iptables-backend {requested}"
    with_rules = [n for n, e in found.items() if e.usable and e.rules]
    if len(with_rules) == 1:
        name = with_rules[0]
        return name, f"{name} already holds {found[name].rules} rules or chains in this namespace"
    if len(with_rules) == 2:
        holding = [n for n in with_rules if found[n].sidecar_chains]
        name = holding[0] if len(holding) == 1 else "legacy"
        why = "it holds the sidecar's chains" if len(holding) == 1 else "legacy wins a tie, as in istio-iptables"
        return name, f"both legacy and nft hold rules; using {name}: {why}"
    if nft.usable:
        return "nft", "no rules in either backend; nft preferred"
    if legacy.usable:
        return "legacy", f"no rules in either backend; nft not usable ({nft.why_not})"
    raise BackendError(f"no usable iptables backend: legacy: {legacy.why_not}; nft: {nft.why_not}")


def probe(name: str, families: tuple[int, ...], runner: Runner = run) -> Evidence:
    """Look at a backend without changing anything."""
    rules = 0
    sidecar = False
    saved: dict[int, str] = {}
    for family in families:
        save = _tool(family, name, "-save")
        if shutil.which(save) is None:
            return Evidence(False, f"{save} not installed")
        if name == "legacy":
            names = "/proc/net/ip_tables_names" if family == V4 else "/proc/net/ip6_tables_names"
            if not os.path.exists(names):
                return Evidence(False, f"no kernel support ({names} missing)")
            with open(names) as f:
                if not f.read().strip():
                    continue  # no legacy table exists: nothing to read, and reading would create one
        elif shutil.which(_tool(family, name, "-restore")) is None:
            return Evidence(False, f"{_tool(family, name, '-restore')} not installed")
        done = runner([save], None)
        if done.returncode != 0:
            return Evidence(False, f"{save} failed: {done.stderr.strip() or done.returncode}")
        saved[family] = done.stdout
        for table in parse_save(done.stdout).values():
            for chain, lines in table.rules.items():
                rules += len(lines) + (chain not in BUILTIN_TARGETS)
                sidecar |= chain in OUR_CHAINS
    return Evidence(True, rules=rules, sidecar_chains=sidecar, saved=saved)


def choose(requested: str, families: tuple[int, ...], runner: Runner = run) -> tuple[Backend, str]:
    """The backend to use for every family, and why."""
    legacy = probe("legacy", families, runner) if requested in ("auto", "legacy") else Evidence(False, "not requested")
    nft = probe("nft", families, runner) if requested in ("auto", "nft") else Evidence(False, "not requested")
    name, reason = decide(requested, legacy, nft)
    return BACKENDS[name](runner, {"legacy": legacy, "nft": nft}[name].saved), reason
