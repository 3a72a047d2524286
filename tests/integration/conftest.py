"""Fixtures shared by the integration tests (servers come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own database (a test file may override it with another size)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=20)
    assert pool is not None
    yield pool
    await pool.close()


@pytest.fixture
async def empty_schema_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool whose sessions see an empty schema: no migration applied, no tables."""
    admin = await asyncpg.connect(database_url)
    await admin.execute("CREATE SCHEMA nothing_migrated")
    await admin.close()
    pool = await asyncpg.create_pool(
        database_url, min_size=0, max_size=2, server_settings={"search_path": "nothing_migrated"}
    )
    assert pool is not None
    yield pool
    await pool.close()
