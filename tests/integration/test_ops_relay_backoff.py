"""A relay that takes the lock and fails at once (an unmigrated database) backs off: it
does not take the lock again ten times a second, logging two lines each time."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from services.appointments.relay import OutboxRelay


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


class _Retries(logging.Handler):
    """Collects the relay's "retrying in Ns" messages; ``enough`` is set after ``wanted``."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.delays: list[float] = []
        self.enough = asyncio.Event()
        self._wanted = wanted

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"retrying in ([\d.]+)s", record.getMessage())
        if match:
            self.messages.append(record.getMessage())
            self.delays.append(float(match.group(1)))
            if len(self.delays) >= self._wanted:
                self.enough.set()


async def test_a_relay_failing_right_after_taking_the_lock_backs_off(
    empty_schema_pool: asyncpg.Pool, nc: NATS
) -> None:
    retries = _Retries(wanted=4)
    logger = logging.getLogger("services.appointments.relay")
    logger.addHandler(retries)
    stop = asyncio.Event()
    task = asyncio.create_task(OutboxRelay(empty_schema_pool, nc).run(stop))
    try:
        await asyncio.wait_for(retries.enough.wait(), 60)
    finally:
        logger.removeHandler(retries)
        stop.set()
        await asyncio.wait_for(task, 10)
    delays = retries.delays[:4]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    assert "UndefinedTableError" in retries.messages[0]  # the error's type, named
