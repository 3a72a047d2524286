"""The service's pools bound every wait: for a lock another session holds, and for one of
their connections. One locked table must not hold every endpoint for as long as the lock."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from services.appointments.adapters.postgres.errors import database_errors
from services.appointments.adapters.postgres.event_store import (
    APPEND_QUEUE_SECONDS,
    IN_FLIGHT,
    PostgresEventStore,
)
from services.appointments.adapters.postgres.pools import ACQUIRE_SECONDS, share_of
from services.appointments.adapters.system import new_uuid
from services.appointments.bootstrap import create_pool, create_session_pool
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import Appointments, RequestContext
from services.appointments.service_layer.ports import NotSent
from services.errors import ClinicError, Unavailable
from tests.support.builders import principal, schedule_body
from tests.support.clock import ManualClock
from tests.support.proxy import FreezingProxy


async def test_a_statement_waits_2_s_at_most_for_a_lock_and_is_answered_503(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, 2)
    holder = await asyncpg.connect(database_url)
    try:
        assert await pool.fetchval("SHOW lock_timeout") == "2s"
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE visits IN ACCESS EXCLUSIVE MODE")  # an operator's
        began = time.monotonic()
        with pytest.raises(ClinicError) as refused, database_errors():
            await pool.fetch("SELECT * FROM visits LIMIT 1")
        waited = time.monotonic() - began
        assert refused.value.to_problem().status == 503
        assert 1.5 < waited < 5, waited  # the lock stays taken for as long as the test likes
        await transaction.rollback()
    finally:
        await holder.close()
        await pool.close()


async def test_every_pool_keeps_its_lock_timeout_across_releases(database_url: str) -> None:
    """Set by ``SET`` on the statement pools (PgBouncer refuses unknown startup parameters),
    by a startup parameter on the relay's session pool, whose release runs ``RESET ALL``."""
    for make in (create_pool, create_session_pool):
        pool = await make(database_url, 1)
        try:
            for _ in range(3):  # the same connection, released and taken again
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SHOW lock_timeout") == "2s"
                    source = await conn.fetchval(
                        "SELECT source FROM pg_settings WHERE name = 'lock_timeout'"
                    )
                    # Not a startup parameter where a pooler may stand in between.
                    assert source == ("session" if make is create_pool else "client"), source
        finally:
            await pool.close()


async def test_the_dsn_may_set_its_own_lock_timeout(database_url: str) -> None:
    for make in (create_pool, create_session_pool):
        pool = await make(f"{database_url}?lock_timeout=150ms", 1)
        try:
            assert await pool.fetchval("SHOW lock_timeout") == "150ms"
        finally:
            await pool.close()


async def test_a_query_waits_for_a_busy_pool_s_connection_2_s_at_most(database_url: str) -> None:
    pool = await create_pool(database_url, 1)
    try:
        busy = asyncio.ensure_future(pool.execute("SELECT pg_sleep(6)"))
        await asyncio.sleep(0.3)  # it holds the only connection
        began = time.monotonic()
        with pytest.raises(NotSent, match="came free"), database_errors():
            await pool.fetchval("SELECT 1")
        waited = time.monotonic() - began
        assert ACQUIRE_SECONDS - 0.2 < waited < ACQUIRE_SECONDS + 2, waited
        await busy
    finally:
        await pool.close()


async def test_an_append_with_no_connection_in_time_is_answered_unsent(database_url: str) -> None:
    """Its events' share of the pool all taken (slow reads, say): the append is not sent,
    and says so, so the command's cached states stay (they are not in doubt)."""
    pool = await create_pool(database_url, 4)  # the events' share: 2 connections
    store = PostgresEventStore(pool)
    clock = ManualClock()
    app = Appointments(store, store, clock, new_uuid, Rules())
    staff = RequestContext(principal=principal("staff"))
    release = asyncio.Event()

    async def hold() -> None:
        async with share_of(pool, "events").acquire():
            await release.wait()

    holders = []
    try:
        cached = (await app.schedule(staff, schedule_body(clock.now))).view.appointment_id
        holders = [asyncio.ensure_future(hold()) for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(NotSent, match="nothing was changed"):
            await app.schedule(staff, schedule_body(clock.now))
        with pytest.raises(NotSent), database_errors():  # the pool itself, not shared out
            async with (
                pool.acquire(timeout=0.1),
                pool.acquire(timeout=0.1),
                pool.acquire(timeout=0.1),
            ):
                pass
        assert app._cache.get(cached) is not None
    finally:
        release.set()
        await asyncio.gather(*holders)
        await pool.close()
    check = await asyncpg.connect(database_url)
    try:
        assert await check.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await check.close()


async def test_appends_queued_behind_a_hung_database_are_answered_503_unsent(
    database_url: str,
) -> None:
    """PostgreSQL stops answering (a partition) with appends in flight: those queued behind
    them answer ``503`` once they have waited for their turn 5 s, not when the
    statements in flight give up (~10 s each, more on a server that hangs); and they were
    never sent. Once the database answers again, the ones in flight are written."""
    async with FreezingProxy(database_url) as proxy:
        pool = await create_pool(proxy.url, 4)
        store = PostgresEventStore(pool)
        clock = ManualClock()
        app = Appointments(store, store, clock, new_uuid, Rules())
        staff = RequestContext(principal=principal("staff"))
        try:
            await app.schedule(staff, schedule_body(clock.now))
            # Connections for every statement in flight are made (a pool warm from load).
            await asyncio.gather(*(pool.execute("SELECT pg_sleep(0.1)") for _ in range(4)))
            proxy.freeze()
            in_flight = []
            for _ in range(IN_FLIGHT):  # each in a statement of its own
                in_flight.append(
                    asyncio.ensure_future(app.schedule(staff, schedule_body(clock.now)))
                )
                await asyncio.sleep(0.1)  # out, on a connection that will not answer
            began = time.monotonic()
            queued = [
                asyncio.ensure_future(app.schedule(staff, schedule_body(clock.now)))
                for _ in range(5)
            ]
            # Answered before the statements in flight give up (the pool's 10 s timeout).
            done, _ = await asyncio.wait(queued, timeout=APPEND_QUEUE_SECONDS + 3)
            waited = time.monotonic() - began
            assert len(done) == 5, "the queued appends waited for the hung statements"
            for append in queued:
                refused = append.exception()
                assert isinstance(refused, Unavailable), refused
            assert waited < APPEND_QUEUE_SECONDS + 2, waited
            assert not any(append.done() for append in in_flight)
            proxy.thaw()
            written = await asyncio.wait_for(asyncio.gather(*in_flight), 30)
        finally:
            proxy.thaw()
            await pool.close()
    check = await asyncpg.connect(database_url)
    try:
        stored = {row["stream_id"] for row in await check.fetch("SELECT stream_id FROM events")}
    finally:
        await check.close()
    assert {w.view.appointment_id for w in written} <= stored
    assert len(stored) == 1 + IN_FLIGHT  # the first booking and those in flight; none queued
