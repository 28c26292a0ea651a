"""watch_file: every way a file named by a setting gets replaced is seen, and nothing else is.

In-process on trio's autojump clock: the interval passes in virtual time, the file is real.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from pilotfish.common.watch import file_signature, watch_file

INTERVAL = 0.2  # virtual seconds
QUIET = 50 * INTERVAL  # this long without a call is "no call"


class Watched:
    """A running watch_file on `path`; its calls arrive on `calls`."""

    def __init__(self, path: Path, calls: trio.MemoryReceiveChannel[str]) -> None:
        self.path = path
        self.calls = calls

    async def next_call(self) -> str:
        with trio.fail_after(2 * INTERVAL):  # the first look after the change
            return await self.calls.receive()

    async def no_call(self) -> None:
        with trio.move_on_after(QUIET):
            why = await self.calls.receive()
            pytest.fail(f"called ({why}) without a change")


def watching(path: Path, test: Callable[[Watched], Awaitable[None]], since_start: bool = True,
             hup: bool = False, on_change: Callable[[str], Awaitable[None]] | None = None) -> None:
    """Run `test` while path is watched (from its signature now if `since_start`, else from one
    that differs), with SIGHUP as a reload signal if `hup`."""
    seen = file_signature(str(path)) if since_start else None

    async def main() -> None:
        send, receive = trio.open_memory_channel[str](100)

        async def record(why: str) -> None:
            if on_change is not None:
                await on_change(why)
            send.send_nowait(why)

        async def watch(signals: AsyncIterator[int] | None) -> None:
            await watch_file(str(path), seen, INTERVAL, record, signals)

        with trio.open_signal_receiver(signal.SIGHUP) as hups:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, hups if hup else None)
                await test(Watched(path, receive))
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def after_a_tick(path: Path) -> None:
    """Return once the kernel's clock for file times has moved past `path`'s ctime: that clock is
    coarse (a tick is milliseconds), and two writes within one tick carry the same times. Polls
    a probe file's ctime, with a deadline."""
    before = os.stat(path).st_ctime_ns
    probe = path.with_name(path.name + ".probe")
    probe.touch()
    deadline = time.monotonic() + 5
    while os.stat(probe).st_ctime_ns <= before:
        assert time.monotonic() < deadline, "the file clock did not move in 5 s"
        os.utime(probe)
    probe.unlink()


def rewrite_in_place(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "table.json"
    path.write_bytes(b"version one\n")
    return path


def test_no_call_without_a_change_and_reading_is_no_change(table: Path) -> None:
    async def test(w: Watched) -> None:
        await w.no_call()
        assert table.read_bytes() == b"version one\n"
        await w.no_call()

    watching(table, test)


def append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"more\n")


def rewrite_same_size(path: Path) -> None:
    """In place, with the same size and inode: a later mtime (and ctime) only."""
    before = os.stat(path)
    after_a_tick(path)
    rewrite_in_place(path, b"version two\n")
    now = os.stat(path)
    assert (now.st_size, now.st_ino) == (before.st_size, before.st_ino)


def rewrite_with_mtime_put_back(path: Path) -> None:
    """As `cp -p` or `rsync -t` over the file leave it: only the ctime tells."""
    before = os.stat(path)
    after_a_tick(path)
    rewrite_in_place(path, b"version two\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_mtime_ns, now.st_size, now.st_ino) == (before.st_mtime_ns, before.st_size, before.st_ino)


def rename_over(path: Path) -> None:
    """As editors and ConfigMap updates replace a file, here with the same size and mtime (`cp -p`
    then `mv`), maybe within the same tick: the inode tells."""
    before = os.stat(path)
    new = path.with_name(path.name + ".tmp")
    new.write_bytes(b"version two\n")
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(new, path)
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert now.st_ino != before.st_ino


def fifo_put_there(path: Path) -> None:
    """Never opened: opening it for reading would block until a writer came."""
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("change", [append, rewrite_same_size, rewrite_with_mtime_put_back, rename_over,
                                    fifo_put_there])
def test_a_change_is_seen_once(table: Path, change: Callable[[Path], None]) -> None:
    async def test(w: Watched) -> None:
        change(table)
        assert await w.next_call() == "file change"
        await w.no_call()

    watching(table, test)


def test_a_deleted_file_is_seen_and_again_when_it_comes_back(table: Path) -> None:
    async def test(w: Watched) -> None:
        table.unlink()
        assert await w.next_call() == "file change"
        await w.no_call()  # missing is missing: not a change at every look
        table.write_bytes(b"version two\n")
        assert await w.next_call() == "file change"
        await w.no_call()

    watching(table, test)


def test_a_change_before_the_watch_started_is_seen(table: Path) -> None:
    """The caller passes the signature from before its first load: a change during it counts."""
    async def test(w: Watched) -> None:
        assert await w.next_call() == "file change"
        await w.no_call()

    watching(table, test, since_start=False)


def test_a_reload_signal_calls_at_once_and_counts_the_file_as_seen(table: Path) -> None:
    async def test(w: Watched) -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(INTERVAL / 10):  # not at the next look: at once
            assert await w.calls.receive() == "SIGHUP"
        await w.no_call()
        table.write_bytes(b"version two, longer\n")
        os.kill(os.getpid(), signal.SIGHUP)  # with a change: one call, for the signal
        assert await w.next_call() == "SIGHUP"
        await w.no_call()

    watching(table, test, hup=True)


def test_changes_during_a_call_make_one_more_call_after_it(table: Path) -> None:
    """Reloads never overlap, and what changed meanwhile is not lost."""
    busy = trio.Event()
    release = trio.Event()

    async def slow(why: str) -> None:
        if not busy.is_set():
            busy.set()
            await release.wait()

    async def test(w: Watched) -> None:
        table.write_bytes(b"version two, longer\n")
        await busy.wait()
        table.write_bytes(b"version three, longer still\n")
        await trio.sleep(QUIET)  # many looks' worth while the call runs
        table.unlink()
        release.set()
        assert await w.next_call() == "file change"  # the first call, done
        assert await w.next_call() == "file change"  # the rest, at the next look
        await w.no_call()

    watching(table, test, on_change=slow)
