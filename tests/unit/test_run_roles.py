"""``run_roles``: a failing role stops the others, and none outlives the call."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from services.appointments import main
from services.appointments.bootstrap import Container


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
    monkeypatch.setattr(main, "SHUTDOWN_GRACE_SECONDS", 0.05)
    stop = asyncio.Event()

    with pytest.raises(RuntimeError, match="relay failed"):
        await main.run_roles(cast(Container, object()), ["api", "relay"], stop)

    assert stop.is_set()
    assert unwound.is_set()  # before the container (and its pool) would be closed
