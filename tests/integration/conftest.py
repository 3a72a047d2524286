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
