"""The notification consumer's start (:meth:`EventConsumer._begin`), with hand-written fakes:
it fetches nothing before the service's first start is recorded, and waits out a database
not migrated yet as the expected state it is (the migrate Job may run alongside a new pod),
without an error and its traceback every few seconds."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import msgspec
import nats.errors
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
        self.naks: list[str] = []

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        if payload.startswith(b"-NAK"):
            self.naks.append(subject)
        elif payload in (b"", b"+ACK"):  # an empty reply acknowledges
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


@pytest.mark.parametrize("concurrency", [3, 16])  # 16: room for every event at once
async def test_a_batchs_appointments_are_handled_at_once_each_in_order(concurrency: int) -> None:
    client, handler = _Client(), RecordingHandler()
    consumer = EventConsumer(
        cast(Any, None),
        cast(EventHandler, handler),
        cast(NotificationStore, None),
        Tuning(handle_concurrency=concurrency),
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
    assert handler.most == min(concurrency, 5)  # appointments at once, as many as allowed
    assert len(client.acks) == 15


def _recording_consumer(handler: object, js: object = None) -> EventConsumer:
    return EventConsumer(
        cast(Any, js),
        cast(EventHandler, handler),
        cast(NotificationStore, None),
        Tuning(handle_concurrency=3),
        Hooks(),
        lambda: None,
    )


async def test_a_stop_hands_back_what_is_not_handled_yet() -> None:
    client, handler = _Client(), RecordingHandler()
    booking = Booking()
    batch = [_message(client, booking, booking.scheduled(NOW), 1)]
    stop = asyncio.Event()
    stop.set()
    await _recording_consumer(handler)._handle_fetched(batch, stop)
    assert handler.applied == {} and client.acks == [] and len(client.naks) == 1


class OutageHandler(RecordingHandler):
    """PostgreSQL refusing connections until ``back`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.back = asyncio.Event()

    async def apply(self, envelope: EventEnvelope, event: object, sequence: int) -> Outcome:
        if not self.back.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        return await super().apply(envelope, event, sequence)


async def test_the_lag_grows_while_a_database_outage_holds_an_event() -> None:
    client, handler = _Client(), OutageHandler()
    consumer = _recording_consumer(handler)
    booking = Booking()
    now = datetime.now(UTC)
    batch = [_message(client, booking, booking.scheduled(now - timedelta(seconds=1)), 1)]
    handling = asyncio.create_task(consumer._handle_fetched(batch, asyncio.Event()))
    await asyncio.sleep(0.1)
    assert 1.0 <= consumer._lag() < 1.5
    await asyncio.sleep(1.2)  # still held: the backlog behind it ages
    assert consumer._lag() >= 2.2
    handler.back.set()
    await asyncio.wait_for(handling, 10)
    assert consumer._lag() >= 2.2 and len(client.acks) == 1  # the last handled, until caught up


class NatsAway:
    async def consumer_info(self, *_: object) -> object:
        raise nats.errors.TimeoutError


async def test_an_idle_consumer_without_nats_keeps_its_lag_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    consumer = _recording_consumer(RecordingHandler(), NatsAway())
    consumer._last_lag = 12.0
    with caplog.at_level(logging.DEBUG, logger="services.notifications.consumer"):
        await consumer._caught_up()
    assert consumer._lag() == 12.0 and caplog.records == []
