"""PostgreSQL refusing for a while (read-only after a failover, a full disk, a deadlock)
is ridden out by the notification workers like an outage, never taken for a failure of
their own; a refusal of what a statement holds is not retried."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import cast

import asyncpg
import pytest
from prometheus_client import REGISTRY

from contracts.notifications import NOTIFICATION_KINDS, Notification
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import ClaimedDelivery, DeliveryStore
from services.notifications.runtime import Hooks, Tuning, run_loop
from tests.support.builders import planned_notification

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)


def _read_only() -> asyncpg.ReadOnlySQLTransactionError:
    return asyncpg.ReadOnlySQLTransactionError("cannot execute UPDATE in a read-only transaction")


class _Outbox:
    """One claimable delivery; each outcome write fails with the next of ``refusals``."""

    def __init__(self, *refusals: Exception) -> None:
        notification = planned_notification()
        self.due = [
            ClaimedDelivery(
                notification=notification,
                channel="push",
                attempts=1,
                in_doubt=False,
                previous_claimed_at=None,
            )
        ]
        self.refusals = list(refusals)
        self.writes = 0
        self.recorded: list[tuple[str, uuid.UUID]] = []

    async def claim(self, *_: object) -> list[ClaimedDelivery]:
        due, self.due = self.due, []
        return due

    async def handing_over(self, *_: object) -> bool:
        return True  # the hand-over mark; ``refusals`` are for the outcome's record

    async def sent(self, notification_id: uuid.UUID, *_: object) -> bool:
        return await self._write("sent", notification_id)

    async def retry(self, notification_id: uuid.UUID, *_: object) -> bool:
        return await self._write("retry", notification_id)

    async def finish(
        self, notification_id: uuid.UUID, _: str, __: int, status: str, *___: object
    ) -> bool:
        return await self._write(status, notification_id)

    async def _write(self, outcome: str, notification_id: uuid.UUID) -> bool:
        """Applied under the claim (it is still the worker's)."""
        self.writes += 1
        if self.refusals:
            raise self.refusals.pop(0)
        self.recorded.append((outcome, notification_id))
        return True


class _Push:
    name = "push"

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def send(self, notification: Notification) -> str | None:
        self.sent.append(notification)
        return None


def _worker(outbox: _Outbox, channel: _Push) -> DeliveryWorker:
    store = cast(DeliveryStore, outbox)
    return DeliveryWorker(store, channel, lambda: NOW, Tuning(), Hooks(), resend_window=None)


async def test_a_read_only_database_does_not_lose_the_record_of_a_sent_delivery() -> None:
    """The push went out; recording it meets a server still read-only after a failover.
    Given up at once, the lease would run out and the delivery come back in doubt."""
    outbox, push = _Outbox(_read_only()), _Push()
    assert await _worker(outbox, push).deliver_due() == 1
    assert outbox.recorded == [("sent", push.sent[0].notification_id)]
    assert outbox.writes == 2
    assert len(push.sent) == 1


async def test_a_refusal_of_the_outcome_itself_is_not_retried() -> None:
    outbox, push = _Outbox(asyncpg.CheckViolationError("violates check constraint")), _Push()
    assert await _worker(outbox, push).deliver_due() == 1
    assert outbox.recorded == []
    assert outbox.writes == 1


async def test_a_worker_waits_out_a_read_only_database_without_reporting_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logged as the database being unavailable, not as a crash with a traceback, and
    tried again only after a pause: never a hot loop."""
    stop = asyncio.Event()
    calls: list[float] = []

    async def step() -> int:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise _read_only()
        stop.set()
        return 0

    with caplog.at_level(logging.INFO, logger="services.notifications.runtime"):
        await asyncio.wait_for(run_loop("push delivery", step, stop, asyncio.Event(), 0.01), 5)

    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.2
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "database unavailable" in record.getMessage()
    assert record.exc_info is None


@pytest.mark.parametrize(
    "refusal",
    [
        asyncpg.UndefinedColumnError("column d.sending_phase does not exist"),
        asyncpg.UndefinedTableError('relation "notification_deliveries" does not exist'),
    ],
)
async def test_a_worker_before_clinic_migrate_warns_without_a_traceback(
    caplog: pytest.LogCaptureFixture, refusal: asyncpg.PostgresError
) -> None:
    """A new pod may start before the migrate Job has run (operations.md, upgrades)."""
    stop = asyncio.Event()
    calls = 0

    async def step() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise refusal
        stop.set()
        return 0

    with caplog.at_level(logging.INFO, logger="services.notifications.runtime"):
        await asyncio.wait_for(run_loop("push delivery", step, stop, asyncio.Event(), 0.01), 5)

    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "not migrated yet" in record.getMessage()
    assert record.exc_info is None


# ------------------------------------------------------------- NATS connection down


async def test_a_worker_claims_nothing_while_its_nats_connection_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Claimed, the push would only fail and spend an attempt; it waits, due, instead, and
    goes out on its first attempt once the connection is back."""
    outbox, push = _Outbox(), _Push()
    link = {"up": False}
    store = cast(DeliveryStore, outbox)
    worker = DeliveryWorker(
        store, push, lambda: NOW, Tuning(), Hooks(), None, connected=lambda: link["up"]
    )
    with caplog.at_level(logging.INFO, logger="services.notifications.delivery"):
        for _ in range(Tuning().max_attempts + 1):
            assert await worker.deliver_due() == 0
        assert len(outbox.due) == 1  # not claimed
        assert push.sent == []
        link["up"] = True
        assert await worker.deliver_due() == 1

    assert outbox.recorded == [("sent", push.sent[0].notification_id)]
    assert [r.getMessage() for r in caplog.records] == [
        "push delivery waits: the NATS connection is down; nothing is claimed until it is back",
        "push delivery resumes: NATS is connected again",
        "notification sent",
    ]


def test_a_worker_exports_its_channels_failures_at_zero_before_the_first() -> None:
    """``increase()`` misses the first count of a series that appears with it: the alert on
    failed deliveries must see a series at 0 from the start."""

    class _Pigeon(_Push):
        name = "pigeon"  # a channel no other test counts on

    _worker(_Outbox(), _Pigeon())
    for kind in NOTIFICATION_KINDS:
        labels = {"kind": kind, "channel": "pigeon", "result": "failed"}
        assert REGISTRY.get_sample_value("clinic_notifications_total", labels) == 0
