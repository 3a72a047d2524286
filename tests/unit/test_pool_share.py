"""``PoolShare``: a share's turns follow its connections, even through a cancelled release."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.appointments.adapters.postgres.pools import PoolShare


class SlowReleasePool:
    """A pool whose releases take until :attr:`released` is set, shielded from
    cancellation as asyncpg's are (``Pool.release`` shields the connection's reset)."""

    def __init__(self) -> None:
        self.out = 0
        self.released = asyncio.Event()

    async def acquire(self) -> object:
        self.out += 1
        return object()

    async def release(self, _conn: Any) -> None:
        await asyncio.shield(self._release())

    async def _release(self) -> None:
        await self.released.wait()
        self.out -= 1


async def test_a_turn_comes_back_when_its_connection_does_not_when_the_release_is_cancelled() -> (
    None
):
    pool = SlowReleasePool()
    share = PoolShare(pool, 1)  # type: ignore[arg-type]

    async def hold() -> None:
        async with share.acquire():
            pass

    async def next_query() -> None:
        async with share.acquire():
            assert pool.out == 1  # its turn came with the connection back

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)  # in its release, which waits for the pool
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert pool.out == 1  # the connection is still being released...
    following = asyncio.create_task(next_query())
    try:
        await asyncio.sleep(0.1)
        assert not following.done()  # ... so the share's one turn is not free yet
    finally:
        pool.released.set()
    async with asyncio.timeout(1):
        await following
