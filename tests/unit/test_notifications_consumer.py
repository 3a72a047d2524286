"""The notification consumer's start (:meth:`EventConsumer._begin`), with hand-written fakes:
it fetches nothing before the service's first start is recorded, and waits out a database
not migrated yet as the expected state it is (the migrate Job may run alongside a new pod),
without an error and its traceback every few seconds."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import pytest

from services.notifications.consumer import EventConsumer
from services.notifications.handlers import EventHandler
from services.notifications.runtime import Hooks, Tuning
from services.notifications.store import NotificationStore

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)


class NotMigratedHandler:
    """A handler whose database lacks ``notification_first_start`` for ``failures`` tries."""

    def __init__(self, stop: asyncio.Event, failures: int) -> None:
        self.stop = stop
        self.failures = failures
        self.calls = 0

    async def begin(self) -> datetime:
        self.calls += 1
        if self.calls > self.failures:
            return NOW
        if self.calls == self.failures:
            self.stop.set()  # stopped while it waits: its sleep ends at once
        raise asyncpg.UndefinedTableError('relation "notification_first_start" does not exist')


class NoJetStream:
    """Fails the test if the consumer subscribes."""

    def __getattr__(self, name: str) -> Any:
        pytest.fail(f"the consumer used JetStream ({name}) before its first start")


def _consumer(handler: NotMigratedHandler) -> EventConsumer:
    return EventConsumer(
        cast(Any, NoJetStream()),
        cast(EventHandler, handler),
        cast(NotificationStore, None),
        Tuning(),
        Hooks(),
        lambda: None,
    )


async def test_a_database_not_migrated_yet_is_waited_out_with_warnings_not_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="services.notifications.consumer")
    stop = asyncio.Event()
    handler = NotMigratedHandler(stop, failures=3)
    await asyncio.wait_for(_consumer(handler).run(stop), 5)
    assert handler.calls == 3  # tried again, then stopped without fetching anything
    records = [r for r in caplog.records if r.name == "services.notifications.consumer"]
    assert len(records) == 3
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
    assert all("not migrated yet" in r.getMessage() for r in records)
