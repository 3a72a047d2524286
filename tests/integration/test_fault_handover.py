"""A consumer instance killed while it holds an appointment's booking: the instance that
takes over must wait for that booking to come back instead of parking the later events.

JetStream redelivers what a dead instance held only after the consumer's ack wait; until
then the survivor sees the appointment's cancellation without its booking. This test makes
that moment exact: a second client bound to the durable consumer takes the booking and
vanishes without acknowledging it (what ``kill -9`` of an instance does), then the
cancellation is published and the notification service runs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled
from contracts.subjects import EVENTS_STREAM
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.relay import OutboxRelay
from services.appointments.service_layer.ports import NewEvent
from services.embedded import EmbeddedNats
from services.notifications.consumer import ensure_consumer
from tests.support.checks import (
    expected_notifications,
    notifications_caught_up,
    parked,
    wait_for,
)
from tests.support.notifications_process import FAST_TUNING
from tests.support.service import running_notifications, service_env

pytestmark = pytest.mark.fault


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


def _events(patient: Actor) -> tuple[AppointmentScheduled, AppointmentCancelled]:
    clinic, now = uuid.uuid4(), datetime.now(UTC)
    scheduled = AppointmentScheduled(
        clinic_id=clinic,
        patient_id=patient.id,
        provider_id=uuid.uuid4(),
        starts_at=now + timedelta(days=2),
        duration_minutes=30,
        timezone="Europe/Berlin",
        scheduled_by=patient,
    )
    cancelled = AppointmentCancelled(clinic_id=clinic, cancelled_by=patient, cancelled_at=now)
    return scheduled, cancelled


def _new(event: AppointmentScheduled | AppointmentCancelled) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))


async def test_a_cancellation_waits_for_the_booking_a_killed_instance_held(
    pool: asyncpg.Pool, nc: NATS, nats_server: EmbeddedNats, database_url: str
) -> None:
    js = nc.jetstream()
    await ensure_events_stream(js)
    await ensure_consumer(js, FAST_TUNING)
    store = PostgresEventStore(pool)
    relay_stopped = asyncio.Event()
    relay = asyncio.create_task(OutboxRelay(pool, nc, poll_interval=0.01).run(relay_stopped))
    appointment = uuid.uuid4()
    scheduled, cancelled = _events(Actor(id=uuid.uuid4(), role="patient"))
    try:
        await store.append(appointment, 0, [_new(scheduled)])
        # The instance that takes the booking, then dies before acknowledging it.
        doomed = await nats.connect(nats_server.url)
        held = await (
            await doomed.jetstream().pull_subscribe_bind(FAST_TUNING.consumer_name, EVENTS_STREAM)
        ).fetch(1, timeout=10)
        assert [m.subject.rsplit(".", 1)[1] for m in held] == ["scheduled"]
        await doomed.close()
        await store.append(appointment, 1, [_new(cancelled)])

        async with running_notifications(service_env(database_url, [nats_server.url])):
            await wait_for(lambda: notifications_caught_up(pool, js), 60, "notified")
    finally:
        relay_stopped.set()
        await relay

    made = await pool.fetch("SELECT kind FROM notifications ORDER BY kind")
    assert await parked(pool) == 0, "the cancellation was parked"
    assert sorted(r["kind"] for r in made) == sorted((await expected_notifications(pool)).values())
    assert [r["kind"] for r in made] == ["appointment-cancelled"] * 2 + [
        "appointment-confirmed"
    ] * 2
