"""The notification consumer's start (:meth:`EventConsumer._begin`), with hand-written fakes:
it fetches nothing before the service's first start is recorded, and waits out a database
not migrated yet as the expected state it is (the migrate Job may run alongside a new pod),
without an error and its traceback every few seconds."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import msgspec
import pytest
from nats.aio.msg import Msg

from contracts.events import EventEnvelope
from contracts.subjects import event_subject
from services.notifications.consumer import EventConsumer
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.runtime import Hooks, Tuning
from services.notifications.store import NotificationStore
from tests.integration.test_notifications_harness import Booking

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


class _Client:
    """What a message's ack and nak need of a NATS client."""

    def __init__(self) -> None:
        self.acks: list[str] = []

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        self.acks.append(subject)


class RecordingHandler:
    """Applies every event, slowly, noting which run at once."""

    def __init__(self) -> None:
        self.running: set[uuid.UUID] = set()
        self.most = 0
        self.overlapped: list[uuid.UUID] = []
        self.applied: dict[uuid.UUID, list[int]] = {}

    async def apply(self, envelope: EventEnvelope, event: object, sequence: int) -> Outcome:
        if envelope.stream_id in self.running:
            self.overlapped.append(envelope.stream_id)
        self.running.add(envelope.stream_id)
        self.most = max(self.most, len(self.running))
        await asyncio.sleep(0.01)
        self.running.discard(envelope.stream_id)
        self.applied.setdefault(envelope.stream_id, []).append(envelope.stream_version)
        return Outcome.APPLIED


def _message(client: _Client, booking: Booking, envelope: EventEnvelope, seq: int) -> Msg:
    kind = envelope.type.removeprefix("Appointment").lower()
    return Msg(
        cast(Any, client),
        subject=event_subject(booking.clinic_id, booking.appointment_id, kind),
        reply=f"$JS.ACK.APPOINTMENTS.notifications.1.{seq}.{seq}.1700000000000000000.0",
        data=msgspec.json.encode(envelope),
    )


async def test_a_batchs_appointments_are_handled_at_once_each_in_order() -> None:
    client, handler = _Client(), RecordingHandler()
    consumer = EventConsumer(
        cast(Any, None),
        cast(EventHandler, handler),
        cast(NotificationStore, None),
        Tuning(handle_concurrency=3),
        Hooks(),
        lambda: None,
    )
    bookings = [Booking() for _ in range(5)]
    stories = [[b.scheduled(NOW), b.cancelled(NOW, b.patient), b.started(NOW)] for b in bookings]
    seq = iter(range(1, 100))
    batch = [  # interleaved, as the stream has them
        _message(client, booking, story[i], next(seq))
        for i in range(3)
        for booking, story in zip(bookings, stories, strict=True)
    ]
    await consumer._handle_fetched(batch, asyncio.Event())
    assert handler.overlapped == []  # never two events of one appointment at once
    assert handler.applied == {b.appointment_id: [1, 2, 3] for b in bookings}  # in order
    assert handler.most == 3  # appointments at once, as many as allowed
    assert len(client.acks) == 15
