"""The service's pools bound every wait: for a lock another session holds, and for one of
their connections. One locked table must not hold every endpoint for as long as the lock."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from services.appointments.adapters.postgres.errors import database_errors
from services.appointments.adapters.postgres.pools import ACQUIRE_SECONDS
from services.appointments.bootstrap import create_pool, create_session_pool
from services.errors import ClinicError, Unavailable


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
        with pytest.raises(Unavailable, match="busy"), database_errors():
            await pool.fetchval("SELECT 1")
        waited = time.monotonic() - began
        assert ACQUIRE_SECONDS - 0.2 < waited < ACQUIRE_SECONDS + 2, waited
        await busy
    finally:
        await pool.close()
