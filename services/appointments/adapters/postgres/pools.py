"""Bounded waits for PostgreSQL connections: a pool whose connections are waited for a
while at most, and shares of it that keep one part of the service from taking them all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg

#: Seconds a query waits for a connection of its pool, all of them busy, before it gives
#: up (``503``); also how long a connection's release may take.
ACQUIRE_SECONDS: Final = 2.0
#: Connections of a pool a share leaves to the rest of the service.
SPARE_CONNECTIONS: Final = 2


def released_already(exc: BaseException) -> bool:
    """Whether a connection's release failed because the pool had taken it back already:
    the connection was lost (PostgreSQL killed, a network cut) between asyncpg's
    ``Pool.release`` checking it and its holder releasing it, and asyncpg's clean-up of the
    lost connection freed the holder meanwhile. Nothing is left to release; raised out of
    the ``finally`` that gives the connection back, it would replace what the query itself
    said (the lost connection, a ``503 unavailable``; or its result) with an error no one
    expects (logged with its stack, counted as ``error``)."""
    return type(exc) is asyncpg.InternalClientError and str(exc).startswith(
        "PoolConnectionHolder.release() called on a free connection holder"
    )


class NoConnectionInTime(TimeoutError):
    """No connection of the pool (or of the share) came free within
    :data:`ACQUIRE_SECONDS`: the query was not sent."""

    def __init__(self) -> None:
        super().__init__("no connection came free in time")


class _BoundedAcquire:
    """asyncpg's acquire (awaited, or as a context) with its timeout told apart from a
    query's: :class:`NoConnectionInTime`."""

    def __init__(self, acquiring: Any) -> None:
        self._acquiring = acquiring

    async def __aenter__(self) -> Any:
        try:
            return await self._acquiring.__aenter__()
        except TimeoutError as exc:
            raise NoConnectionInTime() from exc

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._acquiring.__aexit__(*exc_info)
        except asyncpg.InternalClientError as exc:
            if not released_already(exc):
                raise

    def __await__(self) -> Any:
        return self.__aenter__().__await__()


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose connections are waited for :data:`ACQUIRE_SECONDS` at most
    (asyncpg's own wait has no bound: queries queued behind a locked table waited for as
    long as the lock), by every query made through it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shares: dict[str, PoolShare] = {}

    def acquire(self, *, timeout: float | None = None) -> Any:
        return _BoundedAcquire(
            super().acquire(timeout=ACQUIRE_SECONDS if timeout is None else timeout)
        )

    def share(self, part: str) -> PoolShare | BoundedPool:
        """``part``'s :class:`PoolShare`, one for every user of that part (the api's and the
        projector's reads and writes of the visits view share theirs), which leaves the pool
        :data:`SPARE_CONNECTIONS`; a pool too small to leave them is not shared out."""
        if self.get_max_size() < 2 * SPARE_CONNECTIONS:
            return self
        if part not in self._shares:
            self._shares[part] = PoolShare(self, self.get_max_size() - SPARE_CONNECTIONS)
        return self._shares[part]


class PoolShare:
    """At most ``limit`` of ``pool``'s connections at once, for one part of the service (a
    bulkhead): when its queries stall (a table of its own locked by an operator), the other
    parts still find connections. A query waits :data:`ACQUIRE_SECONDS` at most for its turn
    and its connection together."""

    def __init__(self, pool: asyncpg.Pool, limit: int) -> None:
        self._pool = pool
        self._turns = asyncio.Semaphore(limit)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        try:
            async with asyncio.timeout(ACQUIRE_SECONDS):
                await self._turns.acquire()
                try:
                    conn = await self._pool.acquire()
                except BaseException:
                    self._turns.release()
                    raise
        except TimeoutError as exc:
            raise NoConnectionInTime() from exc
        try:
            yield conn
        finally:
            # Shielded as asyncpg shields the release itself: a query cancelled here (its
            # request cut short) leaves the connection's release running, and the turn
            # must come back with the connection, not before it.
            await asyncio.shield(self._give_back(conn))

    async def _give_back(self, conn: Any) -> None:
        try:
            await self._pool.release(conn)
        except asyncpg.InternalClientError as exc:
            if not released_already(exc):
                raise
        finally:
            self._turns.release()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            status: str = await conn.execute(query, *args)
            return status


def share_of(pool: Any, part: str) -> Any:
    """``part``'s share of ``pool`` if it is the service's (:meth:`BoundedPool.share`);
    another pool or a single connection (tests, benchmarks) as it is."""
    return pool.share(part) if isinstance(pool, BoundedPool) else pool
