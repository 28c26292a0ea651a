"""The agent's components: started in order, each after the one before has started; stopped in
reverse, each after the one started after it has ended; one shutdown path that fails readiness
at once, even while a component is still starting."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pilotfish.agent.components import Component, Shutdown, readiness, run_components

pytestmark = pytest.mark.timeout(10)


class Part:
    def __init__(self, name: str, log: list[str], gate: trio.Event | None = None, reason: str | None = None) -> None:
        self.name, self.log, self.gate, self.reason = name, log, gate, reason

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.log.append(f"start {self.name}")
        if self.gate is not None:
            await self.gate.wait()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0.01)  # a stop that takes a while: the next waits for it
            self.log.append(f"stopped {self.name}")

    def ready(self) -> str | None:
        return self.reason


def test_started_in_order_and_stopped_in_reverse() -> None:
    log: list[str] = []

    async def main() -> None:
        shutdown = Shutdown()
        parts: list[Component] = [Part("a", log), Part("b", log), Part("c", log)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_components, parts, shutdown)
            while len(log) < 3:
                await trio.sleep(0)
            shutdown.stop("test")
        assert shutdown.reason == "test"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert log == ["start a", "start b", "start c", "stopped c", "stopped b", "stopped a"]


def test_a_component_starts_only_once_the_one_before_has_started() -> None:
    log: list[str] = []

    async def main() -> None:
        gate, shutdown = trio.Event(), Shutdown()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_components, [Part("a", log, gate), Part("b", log)], shutdown)
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["start a"]
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["start a", "start b"]
            shutdown.stop("test")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_shutdown_while_a_component_is_starting_stops_the_started_ones() -> None:
    log: list[str] = []

    async def main() -> None:
        shutdown = Shutdown()
        parts: list[Component] = [Part("a", log), Part("b", log, trio.Event()), Part("c", log)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_components, parts, shutdown)
            await trio.testing.wait_all_tasks_blocked()
            shutdown.stop("signal")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert log == ["start a", "start b", "stopped a"]  # b never started serving; c never began


def test_readiness_is_the_first_reason_in_start_order_and_fails_once_stopping() -> None:
    async def main() -> None:
        shutdown = Shutdown()
        parts: list[Component] = [Part("a", [], reason=None), Part("b", [], reason="no table"),
                                  Part("c", [], reason="no cert")]
        ready = readiness(shutdown, parts)
        assert ready() == "no table"
        parts[1].reason = None  # type: ignore[attr-defined]
        assert ready() == "no cert"
        parts[2].reason = None  # type: ignore[attr-defined]
        assert ready() is None
        shutdown.stop("received signal: SIGTERM")
        shutdown.stop("quitquitquit")  # the first reason stays
        assert ready() == "server is terminated: received signal: SIGTERM"

    trio.run(main)


def test_a_component_that_fails_ends_the_agent_with_its_error() -> None:
    class Broken(Part):
        async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            raise RuntimeError("broken")

    async def main() -> None:
        await run_components([Part("a", []), Broken("b", [])], Shutdown())

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert caught.group_contains(RuntimeError, match="broken")
