"""Readiness answers in time even when PostgreSQL takes a query and never answers, and
does not pile up queries on such a server (a hand-written pool that never answers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services import ops
from services.ops import Probes


class SilentPool:
    """Hands out a connection whose queries never get an answer; counts them."""

    def __init__(self) -> None:
        self.queries = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[SilentPool]:
        yield self

    async def fetchval(self, *_: Any) -> Any:
        self.queries += 1
        await asyncio.Event().wait()  # never answered


async def test_a_silent_database_fails_readiness_in_time_with_one_query_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "READY_TIMEOUT_SECONDS", 0.05)
    pool = SilentPool()
    probes = Probes(pool, None)  # type: ignore[arg-type]
    for _ in range(3):
        async with asyncio.timeout(1):
            assert await probes.failing() == ["postgresql unreachable"]
    assert pool.queries == 1  # the first one is still out: no second one is sent
    assert probes._probe is not None
    probes._probe.cancel()  # what a closing pool does to it; nobody is told
    await asyncio.sleep(0)
