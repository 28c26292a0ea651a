"""Run `pilotfish init` in-process with a hook at one point of the apply, to make a race, a kill or
a failure happen exactly there (run inside a namespace: `ip netns exec NS python hooked_init.py
HOOK -- INIT ARGS`). The exit code is init's; a killed run dies of SIGKILL.

Hooks (comma-separated):
  kill-after-family=F    SIGKILL right after family F's tables were committed (4 or 6)
  kill-after-table=F     commit only the first changed table of family F, then SIGKILL (the state
                         a legacy run killed between two table commits leaves)
  kill-after-routes      SIGKILL once the TPROXY routes and ::6 are in, before the first table
  skip-routes            install no routes and no ::6 (the state an older pilotfish, which did
                         the routes after the tables, left when killed between the two)
  fail-after-family=F    commit family F, then fail as the kernel would (the run rolls back)
  fail-after-table=F     commit the first changed table of family F, then fail
  foreign-then-fail=F    commit family F, let another writer add a nat rule, then fail
  rendezvous=DIR:ME:PEER before committing, touch DIR/ME.read and wait (up to 20 s) until the
                         peer run has read the tables too (DIR/PEER.read) or is waiting for the
                         namespace lock (DIR/PEER.waiting): without a lock both runs then commit
                         what they decided from the same empty tables
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from typing import Any

from pilotfish.init import backends, command

Apply = Any


def _first_table(ops: dict[str, list[Any]]) -> dict[str, list[Any]]:
    first = next(t for t, o in ops.items() if o)
    return {first: ops[first]}


def _kill() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hooked_apply(original: Apply, hook: str, value: str) -> Apply:
    def apply(self: backends.Backend, family: int, ops: dict[str, list[Any]]) -> None:
        if hook == "rendezvous":
            _rendezvous(*value.split(":"))
            return original(self, family, ops)
        if str(family) != value:
            return original(self, family, ops)
        if hook.endswith("-table"):
            original(self, family, _first_table(ops))
        else:
            original(self, family, ops)
        if hook.startswith("kill-"):
            _kill()
        if hook == "foreign-then-fail":
            tool = f"{'iptables' if family == 4 else 'ip6tables'}-{self.name}"
            net = "192.0.2.77" if family == 4 else "2001:db8::77"
            subprocess.run([tool, "-t", "nat", "-A", "OUTPUT", "-d", net, "-j", "RETURN"], check=True)
        if hook.startswith(("fail-", "foreign-")):
            raise backends.BackendError(f"injected failure after committing ipv{family}")
        return None

    return apply


def _rendezvous(directory: str, me: str, peer: str) -> None:
    open(os.path.join(directory, f"{me}.read"), "w").close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(os.path.exists(os.path.join(directory, f"{peer}.{what}")) for what in ("read", "waiting")):
            return
        time.sleep(0.01)


def _signal_waiting(directory: str, me: str) -> None:
    """Tell the peer when this run is about to block on a lock (any flock that is busy)."""
    real = fcntl.flock

    def flock(fd: Any, operation: int) -> None:
        try:
            real(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            open(os.path.join(directory, f"{me}.waiting"), "w").close()
            real(fd, operation)

    fcntl.flock = flock  # type: ignore[assignment]


def main() -> int:
    argv = sys.argv[sys.argv.index("--") + 1:]
    for spec in sys.argv[1].split(","):
        hook, _, value = spec.partition("=")
        if hook == "rendezvous":
            directory, me, _ = value.split(":")
            _signal_waiting(directory, me)
        if hook in ("kill-after-routes", "skip-routes"):
            original_install = command._install_routes

            def install(route_spec: Any, hook: str = hook, original: Any = original_install) -> Any:
                if hook == "skip-routes":
                    return lambda: None
                undo = original(route_spec)
                _kill()
                return undo

            command._install_routes = install  # type: ignore[assignment]
        else:
            for cls in backends.BACKENDS.values():
                cls.apply = _hooked_apply(cls.apply, hook, value)  # type: ignore[method-assign]
    return command.main(argv, os.environ)


if __name__ == "__main__":
    sys.exit(main())
