"""Shared fixtures of the notification service's integration tests (no tests here).

A real SMTP server per test (see the mailbox module), a clinic directory answering on
NATS, hand-built appointment events published on the APPOINTMENTS stream the way the relay
publishes them, and the service itself run in-process with a manual clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

from contracts.common import Actor
from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
    event_data,
    event_kind,
    event_type,
)
from contracts.notifications import DirectoryContactReply, Notification
from contracts.subjects import EVENTS_STREAM, NOTIFICATIONS_STREAM, event_subject
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.config import Settings, load_settings
from services.embedded import EmbeddedNats
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import DeliveryStore
from services.notifications.directory import Directory
from services.notifications.email import EmailChannel, SmtpConfig
from services.notifications.main import run_notifications
from services.notifications.runtime import Hooks, Tuning
from tests.integration.test_notifications_mailbox import SmtpSink, free_port, smtp
from tests.support.clock import ManualClock

__all__ = ["SmtpSink", "clinic", "clinic_on_server", "free_port", "smtp"]

#: Tue 15 Jan 2030, 14:00 UTC: 15:00 in Berlin, 09:00 in New York.
STARTS_AT = datetime(2030, 1, 15, 14, 0, tzinfo=UTC)

TEST_TUNING = Tuning(
    redelivery_backoff=(1.0,),
    max_deliver=3,
    fetch_timeout=0.5,
    consumer_check_interval=1.0,
    not_ready_delay=0.2,
    poll_interval=0.05,
    lease=timedelta(seconds=30),
    retry_base=timedelta(seconds=30),
    max_attempts=3,
    directory_silence=0.0,  # a silent directory here is one not deployed
)

_positions = itertools.count(1)


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``check()`` holds (polling), failing the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------- an email worker built by hand


class GatedDirectory:
    """The directory port: answers at once, or (``gate``) once the test lets it; with an
    address, or (not ``known``) with none."""

    def __init__(self, gate: asyncio.Event | None = None, *, known: bool = True) -> None:
        self.gate = gate
        self.known = known
        self.waiting = asyncio.Event()

    async def contact(
        self, user_id: uuid.UUID, clinic_id: uuid.UUID | None = None
    ) -> DirectoryContactReply:
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        email = f"{user_id}@example.test" if self.known else None
        return DirectoryContactReply(email=email, locale="en")


def email_worker(pool: asyncpg.Pool, directory: Any, smtp_url: str, at: datetime) -> DeliveryWorker:
    """An email worker on ``pool`` asking ``directory``, its clock stopped at ``at``."""
    channel = EmailChannel(cast(Directory, directory), SmtpConfig.from_url(smtp_url))
    return DeliveryWorker(DeliveryStore(pool), channel, lambda: at, TEST_TUNING, Hooks(), None)


# ---------------------------------------------------------------------- the clinic


@dataclass
class Booking:
    """One appointment's hand-built events, numbered as the event store numbers them."""

    clinic_id: uuid.UUID = field(default_factory=uuid.uuid4)
    appointment_id: uuid.UUID = field(default_factory=uuid.uuid4)
    patient_id: uuid.UUID = field(default_factory=uuid.uuid4)
    provider_id: uuid.UUID = field(default_factory=uuid.uuid4)
    starts_at: datetime = STARTS_AT
    duration_minutes: int = 30
    timezone: str = "Europe/Berlin"
    version: int = 0

    @property
    def patient(self) -> Actor:
        return Actor(id=self.patient_id, role="patient")

    @property
    def provider(self) -> Actor:
        return Actor(id=self.provider_id, role="provider")

    def envelope(self, event: Event, at: datetime) -> EventEnvelope:
        self.version += 1
        return EventEnvelope(
            event_id=uuid.uuid4(),
            type=event_type(event),
            schema_version=1 if isinstance(event, AppointmentCancelled | AppointmentStarted) else 2,
            stream_id=self.appointment_id,
            stream_version=self.version,
            global_position=next(_positions),
            occurred_at=at,
            correlation_id=uuid.uuid4(),
            data=event_data(event),
        )

    def scheduled(self, at: datetime) -> EventEnvelope:
        return self.envelope(
            AppointmentScheduled(
                clinic_id=self.clinic_id,
                patient_id=self.patient_id,
                provider_id=self.provider_id,
                starts_at=self.starts_at,
                duration_minutes=self.duration_minutes,
                timezone=self.timezone,
                visit_reason="private: must never show in a notification",
                scheduled_by=self.patient,
            ),
            at,
        )

    def cancelled(self, at: datetime, by: Actor) -> EventEnvelope:
        return self.envelope(
            AppointmentCancelled(clinic_id=self.clinic_id, cancelled_by=by, cancelled_at=at), at
        )

    def started(self, at: datetime) -> EventEnvelope:
        return self.envelope(
            AppointmentStarted(clinic_id=self.clinic_id, started_by=self.patient, started_at=at),
            at,
        )

    def email_of(self, role: str) -> str:
        return f"{self.patient_id if role == 'patient' else self.provider_id}@example.test"


@dataclass
class Clinic:
    """The world around the service: NATS, PostgreSQL, SMTP, a directory, a clock."""

    nc: NATS
    js: JetStreamContext
    db: asyncpg.Pool
    sink: SmtpSink
    settings: Settings
    clock: ManualClock
    #: user id -> the directory's reply; unknown users get no answer at all.
    contacts: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    #: Who the directory was asked about, and the clinic the request named.
    asked: list[tuple[uuid.UUID, str | None]] = field(default_factory=list)

    def know(self, booking: Booking) -> None:
        for role in ("patient", "provider"):
            user = booking.patient_id if role == "patient" else booking.provider_id
            self.contacts[user] = {"email": booking.email_of(role), "locale": "en"}

    async def publish(
        self,
        envelope: EventEnvelope,
        clinic_id: uuid.UUID,
        dedupe: bool = True,
        kind: str | None = None,
    ) -> None:
        """Publish as the relay does (``kind``: the subject token of a type not known yet)."""
        headers = {"Nats-Msg-Id": str(envelope.event_id)} if dedupe else None
        kind = kind or event_kind(envelope.type)
        subject = event_subject(clinic_id, envelope.stream_id, kind)
        await self.js.publish(subject, msgspec.json.encode(envelope), headers=headers)

    async def publish_raw(self, data: bytes, clinic_id: uuid.UUID) -> None:
        await self.js.publish(event_subject(clinic_id, uuid.uuid4(), "scheduled"), data)

    @contextlib.asynccontextmanager
    async def running(
        self, hooks: Hooks | None = None, tuning: Tuning = TEST_TUNING
    ) -> AsyncIterator[asyncio.Task[None]]:
        """The notification service, running until the block ends (or the test kills it)."""
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_notifications(self.settings, stop, self.clock, tuning=tuning, hooks=hooks)
        )
        try:
            await eventually(self._consumer_exists, what="the service to start")
            yield task
        finally:
            stop.set()
            if not task.done():
                await asyncio.wait_for(task, 15)
            elif not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _consumer_exists(self) -> bool:
        try:
            await self.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def pushes(self) -> list[Notification]:
        """Every message on the NOTIFICATIONS stream."""
        return [
            msgspec.json.decode(m.data or b"", type=Notification) for m in await self.messages()
        ]

    async def messages(self) -> list[RawStreamMsg]:
        """Every message on the NOTIFICATIONS stream, as stored."""
        try:
            info = await self.js.stream_info(NOTIFICATIONS_STREAM)
        except nats.js.errors.NotFoundError:
            return []
        first, last = info.state.first_seq, info.state.last_seq
        if not info.state.messages:
            return []
        return [await self.js.get_msg(NOTIFICATIONS_STREAM, seq) for seq in range(first, last + 1)]

    async def deliveries(self, status: str | None = None) -> list[asyncpg.Record]:
        return await self.db.fetch(
            """SELECT d.*, n.kind, n.recipient_id FROM notification_deliveries d
               JOIN notifications n USING (notification_id)
               WHERE $1::text IS NULL OR d.status = $1 ORDER BY n.created_at""",
            status,
        )

    async def settled(self) -> bool:
        """The consumer has nothing pending or unacknowledged, and then no delivery waits.
        (In this order: an event acked between the two looks is one whose deliveries the
        second look sees, since the service acks after committing them.)"""
        try:
            info = await self.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
        except nats.js.errors.NotFoundError:
            return False
        if info.num_pending or info.num_ack_pending:
            return False
        busy = await self.db.fetchval(
            """SELECT count(*) FROM notification_deliveries
               WHERE status = 'sending' OR (status = 'pending' AND next_attempt_at <= $1)""",
            self.clock(),
        )
        return not busy

    async def wait_settled(self, within: float = 30.0) -> None:
        await eventually(self.settled, within, "the service to settle")


@pytest.fixture
async def clinic(
    database_url: str, nats_url: str, smtp: tuple[SmtpSink, str]
) -> AsyncIterator[Clinic]:
    """The service's surroundings, with a directory answering for the users it knows."""
    async with _clinic(database_url, nats_url, smtp) as world:
        yield world


@pytest.fixture
async def clinic_on_server(
    database_url: str, nats_server: EmbeddedNats, smtp: tuple[SmtpSink, str]
) -> AsyncIterator[tuple[Clinic, EmbeddedNats]]:
    """The clinic on a NATS server of its own that the test may stop and start again (its
    own connection, and the directory on it, reconnect meanwhile: without limit, every
    0.2 s)."""
    async with _clinic(
        database_url, nats_server.url, smtp, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    ) as world:
        yield world, nats_server


@contextlib.asynccontextmanager
async def _clinic(
    database_url: str, nats_url: str, smtp: tuple[SmtpSink, str], **nats_options: Any
) -> AsyncIterator[Clinic]:
    sink, smtp_url = smtp
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_SMTP_URL": smtp_url,
        }
    )
    nc = await nats.connect(nats_url, **nats_options)
    js = nc.jetstream()
    await ensure_events_stream(js)
    db = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert db is not None
    world = Clinic(nc, js, db, sink, settings, ManualClock(datetime(2030, 1, 12, 9, 0, tzinfo=UTC)))

    async def directory(msg: Any) -> None:
        user = uuid.UUID(msg.subject.rsplit(".", 1)[1])
        world.asked.append((user, (msg.headers or {}).get("Clinic-Id")))
        if user in world.contacts:
            await msg.respond(msgspec.json.encode(world.contacts[user]))

    await nc.subscribe("directory.v1.contact.*", cb=directory)
    try:
        yield world
    finally:
        await nc.close()
        await db.close()
