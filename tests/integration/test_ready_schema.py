"""``/health/ready`` is 503 until the database has the schema this code needs: a process
started against an unmigrated (or older) database must not take traffic."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from services.appointments.adapters.postgres.migrate import migration_files
from services.ops import Probes, serve_ops


@contextlib.asynccontextmanager
async def serving(probes: Probes) -> AsyncIterator[httpx.AsyncClient]:
    """The operations endpoints on a free port, and a client of them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = asyncio.Event()
    server = asyncio.create_task(serve_ops(probes, "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/health/live")).status_code == 200:
                            break
                    await asyncio.sleep(0.02)
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


@pytest.fixture
async def empty_schema_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose sessions see an empty schema: no migration applied."""
    admin = await asyncpg.connect(database_url)
    await admin.execute("CREATE SCHEMA nothing_migrated")
    await admin.close()
    pool = await asyncpg.create_pool(
        database_url, min_size=0, max_size=2, server_settings={"search_path": "nothing_migrated"}
    )
    assert pool is not None
    yield pool
    await pool.close()


async def test_ready_is_503_naming_the_schema_when_nothing_is_migrated(
    empty_schema_pool: asyncpg.Pool,
) -> None:
    async with serving(Probes(empty_schema_pool, None)) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert "schema not migrated" in ready.json()["detail"]


async def test_ready_is_503_until_the_newest_migration_is_applied(pool: asyncpg.Pool) -> None:
    newest = migration_files()[-1][0]
    applied = await pool.fetchval(
        "SELECT applied_at FROM schema_migrations WHERE name = $1", newest
    )
    await pool.execute("DELETE FROM schema_migrations WHERE name = $1", newest)  # an older schema
    probes = Probes(pool, None)
    assert any("schema" in reason and newest in reason for reason in await probes.failing())
    await pool.execute(
        "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2)", newest, applied
    )
    assert await probes.failing() == []


async def test_ready_is_200_on_a_migrated_database(pool: asyncpg.Pool) -> None:
    async with serving(Probes(pool, None)) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
