"""The gap case: a transaction that took a low global position commits late, after hundreds
of later ones, and the relay and the projector still publish and project it.

A follower that tracked "the highest position seen" would skip it for good: its position
was handed out before the others', but it became visible after them. The relay drains the
outbox instead, and the projector follows the stream, so neither can skip it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled, Event
from contracts.subjects import EVENTS_STREAM
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.projector import CONSUMER as PROJECTOR_CONSUMER
from services.appointments.projector import run_projector
from services.appointments.relay import run_relay
from services.appointments.service_layer.ports import NewEvent
from services.embedded import EmbeddedNats
from tests.support.checks import (
    appointments_caught_up,
    consumer_idle,
    events_exactly_once,
    visits_differences,
    wait_for,
)

pytestmark = pytest.mark.fault

LATER = 400  # appointments booked (and half of them cancelled) after the held one
WRITERS = 8


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=12)
    yield pool
    await pool.close()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


CLINIC = uuid.uuid4()
PATIENT = Actor(id=uuid.uuid4(), role="patient")


def _booking() -> AppointmentScheduled:
    return AppointmentScheduled(
        clinic_id=CLINIC,
        patient_id=PATIENT.id,
        provider_id=uuid.uuid4(),
        starts_at=datetime.now(UTC) + timedelta(days=2),
        duration_minutes=30,
        timezone="Europe/Berlin",
        scheduled_by=PATIENT,
    )


def _cancel() -> AppointmentCancelled:
    return AppointmentCancelled(
        clinic_id=CLINIC, cancelled_by=PATIENT, cancelled_at=datetime.now(UTC)
    )


def _new(event: Event) -> list[NewEvent]:
    return [NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))]


async def _book_later(store: PostgresEventStore, count: int, positions: list[int]) -> None:
    for n in range(count):
        appointment = uuid.uuid4()
        positions.append((await store.append(appointment, 0, _new(_booking()))).global_position)
        if n % 2:
            positions.append((await store.append(appointment, 1, _new(_cancel()))).global_position)


async def test_a_transaction_committing_late_at_a_low_position_is_never_skipped(
    pool: asyncpg.Pool, nc: NATS, database_url: str, record_property: pytest.RecordProperty
) -> None:
    js = nc.jetstream()
    stop = asyncio.Event()
    roles = [asyncio.create_task(run(pool, nc, stop)) for run in (run_relay, run_projector)]
    held_conn = await asyncpg.connect(database_url)
    try:
        held = held_conn.transaction()
        await held.start()
        held_id = uuid.uuid4()
        # The store's own append statement, on a connection (it only needs ``fetchrow``)
        # inside a transaction left open.
        held_store = PostgresEventStore(held_conn)  # type: ignore[arg-type]
        appended = await held_store.append(held_id, 0, _new(_booking()))
        store = PostgresEventStore(pool)
        later: list[int] = []
        share = LATER // WRITERS
        await asyncio.gather(*(_book_later(store, share, later) for _ in range(WRITERS)))
        assert min(later) > appended.global_position

        async def later_ones_through() -> bool:
            published = (await js.stream_info(EVENTS_STREAM)).state.messages
            return published == len(later) and await consumer_idle(js, PROJECTOR_CONSUMER)

        await wait_for(later_ones_through, 60, "the later events published and projected")
        assert not await pool.fetchval("SELECT EXISTS (SELECT FROM outbox)")
        assert await pool.fetchval("SELECT count(*) FROM visits") == LATER // WRITERS * WRITERS
        assert (
            await pool.fetchval("SELECT count(*) FROM visits WHERE appointment_id = $1", held_id)
            == 0
        )

        await held.commit()
        await store.append(held_id, 1, _new(_cancel()))
        await wait_for(lambda: appointments_caught_up(pool, js), 60, "the held event through")
    finally:
        await held_conn.close()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*roles), 15)

    events = await events_exactly_once(pool, js)
    assert events == len(later) + 2
    assert not await visits_differences(pool)
    status = await pool.fetchval("SELECT status FROM visits WHERE appointment_id = $1", held_id)
    assert status == "cancelled"
    figures = {
        "held_position": appended.global_position,
        "committed_after_it": len(later),
        "events_on_the_stream": events,
    }
    record_property("figures", json.dumps(figures))
    print("gap:", json.dumps(figures))
