"""The agent as components under one trio nursery: started in order, stopped in reverse.

A component is what the agent runs beside Envoy (the DNS proxy, the xDS client, the status
server; identity, Envoy and the xDS proxy join the same list): it serves until cancelled,
calls `task_status.started()` once it does what it is for, and says through `ready()` whether
the pod may get traffic. The runner starts each only after the one before it has started (the
order of the list is the order of dependence), and on shutdown cancels them one at a time from
the last to the first, each after the one started after it has ended: the xDS client starts
(and serves the copies saved by an earlier run) before the DNS proxy, which then serves a table
from its first query; the status server (readiness already failing) stops last.

One shutdown path: SIGTERM, SIGINT and POST /quitquitquit all call `Shutdown.stop`, which fails
readiness at once and starts the reverse stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

log = logging.getLogger("pilotfish.agent")


class Component(Protocol):
    name: str

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started()` once serving."""
        ...

    def ready(self) -> str | None:
        """None when this component lets the pod be ready, else why not (cheap: probes call it)."""
        ...


class Shutdown:
    """Why the agent is stopping (None while it runs); set once, from the trio thread."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._requested = trio.Event()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.info("agent: %s, shutting down", reason)
            self._requested.set()

    async def wait(self) -> None:
        await self._requested.wait()


def readiness(shutdown: Shutdown, components: Sequence[Component]) -> Callable[[], str | None]:
    """The agent's readiness: not ready from the moment it stops, else the first component
    that is not, in start order."""

    def ready() -> str | None:
        if shutdown.reason is not None:
            return f"server is terminated: {shutdown.reason}"
        for component in components:
            reason = component.ready()
            if reason is not None:
                return reason
        return None

    return ready


@dataclass
class Signals:
    """SIGTERM and SIGINT into the shutdown path (as kubelet stops a container)."""

    shutdown: Shutdown
    name: str = "signals"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                self.shutdown.stop(f"received signal: {signal.Signals(signum).name}")

    def ready(self) -> str | None:
        return None


@dataclass
class _Running:
    component: Component
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)


class _Started:
    """Relays a component's `started()`, remembering that it came."""

    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self.task_status = task_status
        self.came = False

    def started(self, value: None = None) -> None:
        self.came = True
        self.task_status.started()


async def _supervise(component: Component, running: list[_Running], *, task_status: trio.TaskStatus[None]) -> None:
    """Run one component in its own cancel scope, listed in `running` from its first moment
    (so that a shutdown while it starts stops it too, first)."""
    this = _Running(component)
    running.append(this)
    relay = _Started(task_status)
    try:
        with this.scope:
            await component.serve(task_status=relay)  # type: ignore[arg-type]
    finally:
        if not relay.came and this.scope.cancelled_caught:
            relay.started()  # stopped while starting: the start loop ends quietly (shutdown)
        this.ended.set()


async def run_components(components: Sequence[Component], shutdown: Shutdown) -> None:
    """Start `components` in order, then, once `shutdown` is requested (even mid-start), stop
    them in reverse order and return. A component that fails ends the agent."""
    async with trio.open_nursery() as nursery:
        running: list[_Running] = []

        async def stop_in_reverse() -> None:
            await shutdown.wait()
            for this in reversed(running):
                this.scope.cancel()
                await this.ended.wait()
                log.debug("agent: %s stopped", this.component.name)
            nursery.cancel_scope.cancel()  # the start loop, if it is still going

        nursery.start_soon(stop_in_reverse)
        for component in components:
            if shutdown.reason is not None:
                break
            await nursery.start(_supervise, component, running)
