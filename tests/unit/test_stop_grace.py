"""The notification service gets the appointments roles' grace to stop, then is cancelled;
one that cannot be cancelled is left for the process's stop deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.notifications.main import within_grace


async def test_work_that_stops_by_itself_is_waited_for() -> None:
    stop = asyncio.Event()

    async def work() -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # its own unwinding

    runner = asyncio.create_task(within_grace(work(), stop, grace=5, cancel_grace=1))
    stop.set()
    await asyncio.wait_for(runner, 2)


async def test_work_that_ignores_the_stop_is_cancelled_after_the_grace() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(3600)  # a statement the database never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner = asyncio.create_task(within_grace(work(), stop, grace=0.2, cancel_grace=1))
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(runner, 2)
    assert cancelled.is_set() and 0.15 < time.monotonic() - started < 1.5


async def test_work_that_cannot_be_cancelled_is_left_behind() -> None:
    stop = asyncio.Event()
    release = asyncio.Event()

    async def work() -> None:
        while not release.is_set():  # as asyncpg's shielded release of a hung connection
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    runner = asyncio.create_task(within_grace(work(), stop, grace=0.1, cancel_grace=0.1))
    stop.set()
    await asyncio.wait_for(runner, 2)  # returns: the process's deadline takes it from here
    release.set()


async def test_a_failure_is_raised() -> None:
    async def work() -> None:
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        await within_grace(work(), asyncio.Event(), grace=1, cancel_grace=1)


async def test_cancelled_itself_it_lets_its_work_unwind_first() -> None:
    """A sibling failing cancels it: the pool and NATS close after it, so its work must
    have unwound by then."""
    events: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("work cancelled")
            await asyncio.sleep(0.1)  # a batch handed back, say
            events.append("work unwound")
            raise

    runner = asyncio.create_task(within_grace(work(), asyncio.Event(), grace=5, cancel_grace=2))
    await asyncio.sleep(0.05)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    events.append("runner done")
    assert events == ["work cancelled", "work unwound", "runner done"]
