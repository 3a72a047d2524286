"""``run_roles``: a failing role stops the others, none outlives the call, and the grace of a
stop starts when the stop does, whatever set it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from services.appointments import main
from services.appointments.bootstrap import Container

#: A container without NATS (no link to watch): the roles here are fakes.
NO_NATS = cast(Container, SimpleNamespace(nats_link=None))


async def test_a_role_cancelled_after_the_grace_has_unwound_when_run_roles_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unwound = asyncio.Event()

    async def stubborn(_: Container, stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()  # does not stop when asked
        finally:
            await asyncio.sleep(0.05)  # and takes a moment to unwind once cancelled
            unwound.set()

    async def failing(_: Container, stop: asyncio.Event) -> None:
        raise RuntimeError("relay failed")

    monkeypatch.setattr(main, "_role_runners", lambda: {"api": stubborn, "relay": failing})
    monkeypatch.setattr(main, "ROLE_GRACE_SECONDS", 0.05)
    stop = asyncio.Event()

    with pytest.raises(RuntimeError, match="relay failed"):
        await main.run_roles(NO_NATS, ["api", "relay"], stop)

    assert stop.is_set()
    assert unwound.is_set()  # before the container (and its pool) would be closed


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(main, "ROLE_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(main, "CANCEL_GRACE_SECONDS", 0.2)
    return 0.5


async def test_a_role_slow_to_stop_after_a_signal_is_cancelled_after_the_grace(
    monkeypatch: pytest.MonkeyPatch, short_grace: float
) -> None:
    """SIGTERM sets ``stop``; a role that goes on (a drain against a NATS server that
    hangs) is cancelled once the grace is over, not waited for."""
    cancelled = asyncio.Event()

    async def slow_to_stop(container: Any, stop: asyncio.Event) -> None:
        await stop.wait()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def prompt(container: Any, stop: asyncio.Event) -> None:
        await stop.wait()

    monkeypatch.setattr(main, "_role_runners", lambda: {"api": slow_to_stop, "relay": prompt})
    stop = asyncio.Event()
    running = asyncio.create_task(main.run_roles(NO_NATS, ["api", "relay"], stop))
    await asyncio.sleep(0.05)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(running, 5)
    assert time.monotonic() - started < short_grace + 2.0  # not the role's 30 s
    assert cancelled.is_set()


async def test_a_failing_role_stops_the_others_and_its_error_is_raised(
    monkeypatch: pytest.MonkeyPatch, short_grace: float
) -> None:
    stopped = asyncio.Event()

    async def failing(container: Any, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the stream went away")

    async def waiting(container: Any, stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.set()

    monkeypatch.setattr(main, "_role_runners", lambda: {"relay": failing, "api": waiting})
    with pytest.raises(RuntimeError, match="the stream went away"):
        await asyncio.wait_for(main.run_roles(NO_NATS, ["api", "relay"], asyncio.Event()), 5)
    assert stopped.is_set()


async def test_roles_that_return_on_their_own_end_the_run(
    monkeypatch: pytest.MonkeyPatch, short_grace: float
) -> None:
    async def done(container: Any, stop: asyncio.Event) -> None:
        return None

    monkeypatch.setattr(main, "_role_runners", lambda: {"api": done})
    await asyncio.wait_for(main.run_roles(NO_NATS, ["api"], asyncio.Event()), 5)


async def test_what_a_role_cut_short_by_the_grace_raises_is_no_failure(
    monkeypatch: pytest.MonkeyPatch, short_grace: float
) -> None:
    """A stop after SIGTERM exits 0 even if a role turns its cancellation into an error."""

    async def grumbling(container: Any, stop: asyncio.Event) -> None:
        await stop.wait()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RuntimeError("cut short") from None

    monkeypatch.setattr(main, "_role_runners", lambda: {"api": grumbling})
    stop = asyncio.Event()
    running = asyncio.create_task(main.run_roles(NO_NATS, ["api"], stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(running, 5)  # returns, raises nothing
