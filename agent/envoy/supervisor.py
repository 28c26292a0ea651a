"""Envoy as a component of the agent (agent/components.py): written bootstrap, started process,
readiness from its admin API, the drain when the agent stops (docs/envoy.md "Supervision and
drain").

- Started last, after the SDS and xDS sockets listen (else Envoy's reconnect back-off delays its
  first certificate and configuration by seconds: docs/envoy.md).
- Started through `setpriv --pdeathsig KILL` (util-linux), from the trio thread itself: the
  parent-death signal survives the exec into Envoy, so Envoy is killed when the agent dies in
  any way, SIGKILL included, and no orphan holds the pod's ports. It fires when the *thread*
  that started the child ends: trio's worker threads end when idle, the trio thread only with
  the agent. No Python runs between fork and exec (no `preexec_fn`, no `user=`): CPython then
  uses vfork, which runs no fork handlers; with a plain fork, gRPC's fork handlers ran in the
  child of this many-threaded process and Envoy died of SIGABRT before it started, now and
  then (tests/agent/test_injected_pod.py showed it).
- Envoy exiting by itself ends the agent: EnvoyExited carries its status (the agent exits
  non-zero unless Envoy exited 0), as pilot-agent ends with its Envoy.
- Cancelled (the agent's shutdown; readiness already fails): drain, wait, stop; shielded, so the
  drain runs to its end. POST /drain drains without stopping (`drain()`), and a stop after it
  does not wait again; a stop for /quitquitquit does not wait at all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable

import trio

from .admin import Admin, AdminError
from .bootstrap import bootstrap, write_bootstrap
from .readiness import active_connections, readiness
from .settings import EnvoySettings

log = logging.getLogger("pilotfish.envoy")

POLL_PERIOD = 0.1  # seconds between readiness polls until ready: start to ready is what users wait for
CONNECTIONS_PERIOD = 1.0  # Istio's period between active-connection counts while draining
MAX_COUNT_ERRORS = 5  # Istio gives up counting after five failures in a row
STOP_WAIT = 10.0  # seconds for Envoy to exit on SIGTERM before SIGKILL
NOT_STARTED = "Envoy has not started"

class EnvoyNotStarted(Exception):
    """Envoy could not be started (its bootstrap not written, its binary not run)."""


class EnvoyExited(Exception):
    """Envoy ended while the agent was running (not stopped by the agent)."""

    def __init__(self, status: int) -> None:
        super().__init__(describe(status))
        self.status = status


def describe(status: int) -> str:
    """A Popen returncode in words: `exit code 1`, `signal SIGKILL`."""
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit code {status}"


class EnvoyPart:
    name = "envoy"

    def __init__(self, settings: EnvoySettings, stopping: Callable[[], str | None]) -> None:
        """`stopping`: the agent's shutdown reason (None while it runs), read when cancelled."""
        self.settings = settings
        self.admin = Admin(*settings.admin)
        self._stopping = stopping
        self._reason: str | None = NOT_STARTED
        self._config_received = False
        self._drained = False  # POST /drain ran: a stop need not wait for the drain again
        self._token: trio.lowlevel.TrioToken | None = None

    def ready(self) -> str | None:
        return self._reason

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        document = bootstrap(self.settings.params)
        try:
            await trio.to_thread.run_sync(write_bootstrap, self.settings.config_path, document)
        except OSError as err:
            raise EnvoyNotStarted(f"cannot write the bootstrap {self.settings.config_path}: "
                                  f"{err.strerror or err}") from None
        try:
            process = subprocess.Popen([*self.settings.launcher, *self.settings.argv], stdin=subprocess.DEVNULL)
        except OSError as err:
            raise EnvoyNotStarted(f"cannot start {self.settings.argv[0]}: {err.strerror or err}") from None
        log.info("envoy: started, pid %d: %s", process.pid, " ".join(self.settings.argv[:3]))
        pidfd = os.pidfd_open(process.pid)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll)
                task_status.started()
                await trio.lowlevel.wait_readable(pidfd)
                nursery.cancel_scope.cancel()
            status = process.wait()
            self._reason = f"Envoy exited ({describe(status)})"
            if status == -signal.SIGKILL:  # Istio's hint: the kernel's OOM killer sends SIGKILL
                log.warning("envoy: Envoy may have been out of memory killed. Check memory usage and limits.")
            log.error("envoy: exited by itself with %s", describe(status))
            raise EnvoyExited(status)
        finally:
            os.close(pidfd)
            if process.poll() is None:
                with trio.CancelScope(shield=True):
                    await self._stop(process)

    async def _poll(self) -> None:
        """Keep `ready()`'s answer current without I/O on the probe's path, until Envoy is
        ready once: then, as Istio's probe, it is not asked again (a slow admin under load must
        not make a serving pod unready; the agent's shutdown and Envoy's exit fail readiness
        without it)."""
        while True:
            try:
                state = readiness(await self.admin.readiness_stats(), self._config_received)
                self._config_received = state.config_received
                self._reason = state.reason
            except AdminError as err:
                self._reason = f"failed to get readiness stats: {err}"
            if self._reason is None:
                log.info("envoy: ready")
                return
            await trio.sleep(POLL_PERIOD)

    def drain(self) -> None:
        """POST /drain (from a worker thread of the status server): inbound listeners drain,
        Envoy stays up (`skip_exit`); a later stop does not wait for a drain again."""
        if self._token is None:
            log.info("envoy: POST /drain before Envoy started: nothing to drain")
            return
        trio.from_thread.run(self._drain_now, trio_token=self._token)

    async def _drain_now(self) -> None:
        """As Istio's DrainNow: a failed drain is logged, and the stop skips its drain anyway."""
        try:
            await self.admin.drain_listeners(inbound_only=self.settings.drain.inbound_only, skip_exit=True)
            log.info("envoy: draining (POST /drain): Envoy keeps running")
        except AdminError as err:
            log.warning("envoy: POST /drain: drain_listeners failed: %s", err)
        self._drained = True

    async def _stop(self, process: subprocess.Popen[bytes]) -> None:
        reason = self._stopping() or ""
        if reason == "quitquitquit":
            log.info("envoy: stopping at once (quitquitquit)")
        elif self._drained:
            log.info("envoy: already drained, stopping at once")
        else:
            await self._drain(process)
        process.terminate()
        with trio.move_on_after(STOP_WAIT):
            while process.poll() is None:
                await trio.sleep(0.02)
        if process.poll() is None:
            log.warning("envoy: still running %gs after SIGTERM: killing it", STOP_WAIT)
            process.kill()
        log.info("envoy: stopped (%s)", describe(process.wait()))

    async def _drain(self, process: subprocess.Popen[bytes]) -> None:
        """Istio's termination drain: drain the listeners, then wait the termination drain
        duration, or, with EXIT_ON_ZERO_ACTIVE_CONNECTIONS, the minimum drain duration and
        then until no connection is left (or the count cannot be had)."""
        drain = self.settings.drain
        try:
            await self.admin.drain_listeners(inbound_only=drain.inbound_only, skip_exit=False)
        except AdminError as err:
            log.warning("envoy: drain_listeners failed: %s", err)
        if not drain.exit_on_zero_active:
            log.info("envoy: draining for %gs (terminationDrainDuration)", drain.termination_drain)
            await self._sleep_unless_exited(process, drain.termination_drain)
            return
        log.info("envoy: draining for %gs, then until no connection is open", drain.minimum_drain)
        await self._sleep_unless_exited(process, drain.minimum_drain)
        errors = 0
        while process.poll() is None:
            try:
                count = active_connections(await self.admin.connection_stats(), self.settings.known_listeners)
            except AdminError as err:
                errors += 1
                log.warning("envoy: counting active connections failed (%d of %d): %s", errors, MAX_COUNT_ERRORS, err)
                if errors >= MAX_COUNT_ERRORS:
                    return
                await self._sleep_unless_exited(process, CONNECTIONS_PERIOD)
                continue
            errors = 0
            if count is None:
                log.info("envoy: no downstream_cx_active stats: not waiting for connections")
                return
            if count == 0:
                log.info("envoy: no active connections left")
                return
            log.info("envoy: %d active connections left", count)
            await self._sleep_unless_exited(process, CONNECTIONS_PERIOD)

    @staticmethod
    async def _sleep_unless_exited(process: subprocess.Popen[bytes], seconds: float) -> None:
        with trio.move_on_after(seconds):
            while process.poll() is None:
                await trio.sleep(0.05)
