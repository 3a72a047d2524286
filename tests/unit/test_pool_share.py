"""``PoolShare``: a share's turns follow its connections, even through a cancelled release."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
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


class LostOnReleasePool:
    """A pool whose connection was lost as it was given back: asyncpg's clean-up of the
    lost connection freed its holder between ``Pool.release``'s check and the holder's
    release, which then refuses (seen in the chaos soak at a ``kill -9`` of PostgreSQL)."""

    def __init__(self) -> None:
        self.releases = 0

    async def acquire(self) -> object:
        return object()

    async def release(self, _conn: Any) -> None:
        self.releases += 1
        raise asyncpg.InternalClientError(
            "PoolConnectionHolder.release() called on a free connection holder"
        )


async def test_a_connection_the_pool_took_back_already_leaves_the_querys_own_error() -> None:
    pool = LostOnReleasePool()
    share = PoolShare(pool, 1)  # type: ignore[arg-type]
    for _ in range(2):  # the turn came back: the second query gets one
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            async with share.acquire():
                raise asyncpg.ConnectionDoesNotExistError("connection was closed")
    async with share.acquire():
        pass  # a query that got its answer keeps it
    assert pool.releases == 3


async def test_other_errors_of_a_release_still_raise() -> None:
    class Refusing(LostOnReleasePool):
        async def release(self, _conn: Any) -> None:
            raise asyncpg.InternalClientError("something else")

    share = PoolShare(Refusing(), 1)  # type: ignore[arg-type]
    with pytest.raises(asyncpg.InternalClientError, match="something else"):
        async with share.acquire():
            pass
