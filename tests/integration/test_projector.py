"""The visits projector against real PostgreSQL and NATS: the view follows the stream,
redeliveries change nothing, early events wait, unknown ones are skipped, poison is parked."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from contracts.common import Actor
from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
    event_data,
)
from contracts.subjects import EVENTS_STREAM, event_subject
from services.appointments import projector as projector_module
from services.appointments.adapters.nats.streams import ensure_events_stream
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.visits import (
    PostgresVisits,
    row_of,
    upsert_args,
    upsert_statement,
)
from services.appointments.bootstrap import create_pool
from services.appointments.projector import CONSUMER, VisitsProjector, run_projector
from services.appointments.rebuild import rebuild_visits
from services.appointments.relay import run_relay
from services.appointments.service_layer.ports import NewEvent
from services.appointments.service_layer.visits import Outcome, project
from services.pg_errors import RefusedConnection, unreachable

NOW = datetime.now(UTC).replace(microsecond=0)
STAFF = Actor(id=uuid.uuid4(), role="staff")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    await ensure_events_stream(conn.jetstream())
    yield conn
    await conn.close()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(pool: asyncpg.Pool, nc: NATS, *roles: Any) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(role(pool, nc, stop)) for role in roles]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)


def scheduled(clinic_id: uuid.UUID, hours: float = 2) -> AppointmentScheduled:
    return AppointmentScheduled(
        clinic_id=clinic_id,
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=NOW + timedelta(hours=hours),
        duration_minutes=30,
        timezone="America/New_York",
        visit_reason="check-up",
        scheduled_by=STAFF,
    )


def envelope(stream_id: uuid.UUID, version: int, type_: str, data: dict[str, Any]) -> EventEnvelope:
    return EventEnvelope(
        event_id=uuid.uuid4(),
        type=type_,
        schema_version=1 if type_ != "AppointmentScheduled" else 2,
        stream_id=stream_id,
        stream_version=version,
        global_position=0,
        occurred_at=NOW,
        data=data,
    )


def of(stream_id: uuid.UUID, version: int, event: Event) -> EventEnvelope:
    return envelope(stream_id, version, type(event).__name__, event_data(event))


async def publish(
    nc: NATS, clinic_id: uuid.UUID, item: EventEnvelope | bytes, kind: str = "scheduled"
) -> None:
    body = item if isinstance(item, bytes) else msgspec.json.encode(item)
    stream_id = uuid.uuid4() if isinstance(item, bytes) else item.stream_id
    await nc.jetstream().publish(event_subject(clinic_id, stream_id, kind), body)


async def view(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM visits ORDER BY appointment_id")


async def consumer_idle(nc: NATS) -> bool:
    try:
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
    except NotFoundError:  # not created yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


async def append_workload(
    pool: asyncpg.Pool, clinic_id: uuid.UUID, count: int
) -> dict[uuid.UUID, str]:
    """Schedule ``count`` appointments, cancel every third, start every third; statuses."""
    store = PostgresEventStore(pool)
    expected: dict[uuid.UUID, str] = {}

    async def one(i: int) -> None:
        stream = uuid.uuid4()
        await store.append(
            stream,
            0,
            [NewEvent(event_id=uuid.uuid4(), event=scheduled(clinic_id, 1 + i), occurred_at=NOW)],
        )
        expected[stream] = "scheduled"
        then: Event | None = None
        if i % 3 == 1:
            then = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
        elif i % 3 == 2:
            then = AppointmentStarted(clinic_id=clinic_id, started_by=STAFF, started_at=NOW)
        if then is not None:
            await store.append(
                stream, 1, [NewEvent(event_id=uuid.uuid4(), event=then, occurred_at=NOW)]
            )
            expected[stream] = "cancelled" if i % 3 == 1 else "started"

    for start in range(0, count, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 50, count))))
    return expected


async def test_the_view_follows_the_stream_and_equals_a_rebuild(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    clinic_id = uuid.uuid4()
    async with running(pool, nc, run_relay, run_projector):
        expected = await append_workload(pool, clinic_id, 600)

        async def caught_up() -> bool:
            return await pool.fetchval("SELECT sum(version) FROM visits") == 600 + 400

        await eventually(caught_up)
    rows = await view(pool)
    assert {row["appointment_id"]: row["status"] for row in rows} == expected
    assert all(
        row["clinic_id"] == clinic_id and row["timezone"] == "America/New_York" for row in rows
    )
    assert all(row["ends_at"] - row["starts_at"] == timedelta(minutes=30) for row in rows)
    assert await PostgresVisits(pool, CONSUMER).checkpoint() == 1000
    assert await rebuild_visits(pool) == 600
    assert await view(pool) == rows


async def test_a_redelivered_or_replayed_stream_changes_nothing(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    async with running(pool, nc, run_relay, run_projector):
        await append_workload(pool, uuid.uuid4(), 90)
        # Every event in the view (a visit's version counts its events), not only every
        # visit: the relay may still hold cancels and starts, and it stops with this block.
        await eventually(
            lambda: pool.fetchval(
                "SELECT (SELECT sum(version) FROM visits) = (SELECT count(*) FROM events)"
            )
        )
        await eventually(lambda: consumer_idle(nc))
    before = await view(pool)
    events = await pool.fetchval("SELECT count(*) FROM events")
    duplicates = REGISTRY.get_sample_value(
        "clinic_projector_events_total", {"outcome": "duplicate"}
    )
    # A new consumer with the same name delivers the whole stream again.
    await nc.jetstream().delete_consumer(EVENTS_STREAM, CONSUMER)
    async with running(pool, nc, run_projector):
        await eventually(lambda: consumer_idle(nc))
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
    assert info.delivered.stream_seq == events  # replayed from the first event on
    assert (
        REGISTRY.get_sample_value("clinic_projector_events_total", {"outcome": "duplicate"})
        == (duplicates or 0.0) + events
    )
    assert await view(pool) == before


async def test_applying_the_same_events_twice_changes_nothing(pool: asyncpg.Pool) -> None:
    visits = PostgresVisits(pool)
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    events = [
        of(stream, 1, scheduled(clinic_id)),
        of(
            stream,
            2,
            AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW),
        ),
    ]
    assert await visits.apply(events, 2) == [Outcome.APPLIED, Outcome.APPLIED]
    before = await view(pool)
    assert await visits.apply(events, 2) == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert await visits.apply(events[:1], 1) == [Outcome.DUPLICATE]
    assert await view(pool) == before
    assert await visits.checkpoint() == 2


async def test_an_early_event_waits_for_the_one_before_it(pool: asyncpg.Pool, nc: NATS) -> None:
    """Events the event store does not hold (published by hand here): the early one waits."""
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await publish(nc, clinic_id, of(stream, 2, cancel), "cancelled")
    await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
    async with running(pool, nc, run_projector):
        await eventually(
            lambda: pool.fetchval(
                "SELECT version = 2 FROM visits WHERE appointment_id = $1", stream
            )
        )
        await eventually(lambda: consumer_idle(nc))
    assert await pool.fetchval("SELECT status FROM visits") == "cancelled"
    assert await pool.fetchval("SELECT count(*) FROM parked_messages") == 0


async def test_an_early_event_of_a_stored_stream_is_folded_from_the_store_at_once(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    """The relay published the cancel, but the booking's publish failed and is sent again
    later (minutes, in a long partial outage): the row comes from the event store, which
    holds the booking, instead of the cancel waiting (and being parked after ~2 minutes of
    back-off, the visit left in Upcoming)."""
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    store = PostgresEventStore(pool)
    booking = NewEvent(event_id=uuid.uuid4(), event=scheduled(clinic_id), occurred_at=NOW)
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await store.append(stream, 0, [booking])
    await store.append(stream, 1, [NewEvent(event_id=uuid.uuid4(), event=cancel, occurred_at=NOW)])
    await publish(nc, clinic_id, of(stream, 2, cancel), "cancelled")  # the booking not yet
    async with running(pool, nc, run_projector):
        # Acked at its first delivery: a nak would hold it for 0.5 s, then 1 s, 2 s...
        await eventually(lambda: consumer_idle(nc), within=5)
        assert (
            await pool.fetchval(
                "SELECT (status, version)::text FROM visits WHERE appointment_id = $1", stream
            )
            == "(cancelled,2)"
        )
        await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))  # comes at last
        await eventually(lambda: consumer_idle(nc))
    assert await pool.fetchval("SELECT (status, version)::text FROM visits") == "(cancelled,2)"
    assert await pool.fetchval("SELECT count(*) FROM parked_messages") == 0


async def test_unknown_event_types_are_skipped(pool: asyncpg.Pool, nc: NATS) -> None:
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
    await publish(
        nc, clinic_id, envelope(stream, 2, "AppointmentRescheduled", {"x": 1}), "rescheduled"
    )
    await publish(nc, clinic_id, envelope(uuid.uuid4(), 1, "PatientMoved", {}), "moved")
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await publish(nc, clinic_id, of(stream, 3, cancel), "cancelled")
    async with running(pool, nc, run_projector):
        await eventually(
            lambda: pool.fetchval(
                "SELECT version = 3 FROM visits WHERE appointment_id = $1", stream
            )
        )
        await eventually(lambda: consumer_idle(nc))
    assert await pool.fetchval("SELECT status FROM visits") == "cancelled"
    assert await pool.fetchval("SELECT count(*) FROM visits") == 1


async def test_poison_messages_are_parked_and_never_block(pool: asyncpg.Pool, nc: NATS) -> None:
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    await publish(nc, clinic_id, b"\xff not json")
    await publish(
        nc, clinic_id, envelope(uuid.uuid4(), 1, "AppointmentScheduled", {"clinic_id": "nope"})
    )
    await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
    async with running(pool, nc, run_projector):
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM visits"))
        await eventually(lambda: consumer_idle(nc))
    parked = await pool.fetch("SELECT stream_sequence, reason FROM parked_messages ORDER BY 1")
    assert [row["stream_sequence"] for row in parked] == [1, 2]
    assert "undecodable" in parked[0]["reason"]
    assert "unreadable" in parked[1]["reason"]
    assert await pool.fetchval("SELECT appointment_id FROM visits") == stream


async def test_an_event_the_database_refuses_is_parked_and_its_batch_mates_applied(
    pool: asyncpg.Pool, nc: NATS, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Readable, and refused by PostgreSQL for its content (no NUL in a text): a batch of
    # three that fails is applied one by one, so only that one is held, then parked.
    monkeypatch.setattr(projector_module, "PARK_AFTER", 2)
    clinic_id = uuid.uuid4()
    good = [uuid.uuid4(), uuid.uuid4()]
    refused = msgspec.structs.replace(scheduled(clinic_id), visit_reason="a\u0000b")
    await publish(nc, clinic_id, of(good[0], 1, scheduled(clinic_id)))
    await publish(nc, clinic_id, of(uuid.uuid4(), 1, refused))
    await publish(nc, clinic_id, of(good[1], 1, scheduled(clinic_id)))
    async with running(pool, nc, run_projector):
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM parked_messages"))
        await eventually(lambda: consumer_idle(nc))
    assert sorted(row["appointment_id"] for row in await view(pool)) == sorted(good)
    parked = await pool.fetchrow("SELECT stream_sequence, reason, deliveries FROM parked_messages")
    assert parked["stream_sequence"] == 2 and "never applicable" in parked["reason"]
    assert parked["deliveries"] == 2  # PARK_AFTER's delivery parks it, not the next
    assert "projector interrupted" not in caplog.text


@pytest.mark.fault
async def test_a_read_only_database_neither_uses_up_deliveries_nor_stops_the_projector(
    pool: asyncpg.Pool, nc: NATS, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL refusing writes for a while (read-only after a failover, a full disk):
    the batch waits in place, as during an outage, instead of being taken for poison; a
    message whose parking is refused comes back later, the rest of its batch settled."""
    database = database_url.rsplit("/", 1)[1]
    failed = REGISTRY.get_sample_value("clinic_projector_events_total", {"outcome": "failed"})
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    await pool.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    await pool.expire_connections()
    assert await pool.fetchval("SHOW default_transaction_read_only") == "on"
    await publish(nc, clinic_id, b"\xff not json")
    await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
    async with running(pool, nc, run_projector):
        await asyncio.sleep(2)  # refused all along
        assert await pool.fetchval("SELECT count(*) FROM visits") == 0
        await _writable(pool, database)
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM visits"))
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM parked_messages"))
        await eventually(lambda: consumer_idle(nc))
    assert await pool.fetchval("SELECT appointment_id FROM visits") == stream
    assert "undecodable" in await pool.fetchval("SELECT reason FROM parked_messages")
    # Parked on its first delivery: waiting for the database spent none.
    assert await pool.fetchval("SELECT deliveries FROM parked_messages") == 1
    # Not one delivery was spent on "cannot apply", and the loop never broke off.
    assert (
        REGISTRY.get_sample_value("clinic_projector_events_total", {"outcome": "failed"}) == failed
    )
    assert "projector interrupted" not in caplog.text


@pytest.mark.fault
async def test_a_database_closed_to_connections_is_waited_out_as_an_outage(
    nc: NATS, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``ALLOW_CONNECTIONS false`` (an operator's maintenance): new connections are refused
    with SQLSTATE 55000, which is no statement's fault. The projector holds its message as
    while PostgreSQL is down, spending no delivery, and applies it once the database opens."""
    head, database = database_url.rsplit("/", 1)
    outcome = {"outcome": "failed"}
    failed = REGISTRY.get_sample_value("clinic_projector_events_total", outcome) or 0.0
    service_pool = await create_pool(database_url)  # the service's, as the projector has it
    admin = await asyncpg.connect(f"{head}/postgres")  # (a database can't close itself)
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    try:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", database
        )
        with pytest.raises(RefusedConnection) as refused:
            await service_pool.fetchval("SELECT 1")
        assert unreachable(refused.value)
        await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
        async with running(service_pool, nc, run_projector):
            await asyncio.sleep(3)  # refused all along
            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            await eventually(lambda: service_pool.fetchval("SELECT count(*) = 1 FROM visits"))
            await eventually(lambda: consumer_idle(nc))
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
        await service_pool.close()
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
    assert info.num_redelivered == 0  # held in place: no delivery spent
    assert (REGISTRY.get_sample_value("clinic_projector_events_total", outcome) or 0.0) == failed
    assert "cannot apply" not in caplog.text


async def _writable(pool: asyncpg.Pool, database: str) -> None:
    async with pool.acquire() as conn:
        await conn.execute("SET default_transaction_read_only = off")
        await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await conn.execute("RESET default_transaction_read_only")
    await pool.expire_connections()


@pytest.mark.fault
async def test_projectors_cut_off_at_random_points_leave_the_view_equal_to_a_rebuild(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    async with running(pool, nc, run_relay):
        writing = asyncio.create_task(append_workload(pool, uuid.uuid4(), 300))
        for _ in range(8):
            # A cancelled task stops wherever it is: mid-transaction, between commit and ack...
            crashed = asyncio.create_task(run_projector(pool, nc, asyncio.Event()))
            await asyncio.sleep(random.uniform(0.05, 0.3))
            crashed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await crashed
        await writing
        async with running(pool, nc, run_projector):
            # Messages a crashed projector held come back after the ack wait.
            await eventually(lambda: consumer_idle(nc))
            await eventually(
                lambda: pool.fetchval(
                    "SELECT (SELECT sum(version) FROM visits) = (SELECT count(*) FROM events)"
                )
            )
    live = await view(pool)
    assert len(live) == 300
    assert await rebuild_visits(pool) == 300
    assert await view(pool) == live
    assert await pool.fetchval("SELECT count(*) FROM parked_messages") == 0


@pytest.mark.fault
async def test_a_deleted_consumer_is_created_again(pool: asyncpg.Pool, nc: NATS) -> None:
    stop = asyncio.Event()
    projector = VisitsProjector(pool, nc, check_after=0.5)
    task = asyncio.create_task(projector.run(stop))
    try:
        await eventually(lambda: consumer_idle(nc))
        await nc.jetstream().delete_consumer(EVENTS_STREAM, CONSUMER)
        stream, clinic_id = uuid.uuid4(), uuid.uuid4()
        await publish(nc, clinic_id, of(stream, 1, scheduled(clinic_id)))
        await eventually(lambda: pool.fetchval("SELECT count(*) = 1 FROM visits"), within=30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_concurrent_and_replayed_applies_converge_on_the_fold(pool: asyncpg.Pool) -> None:
    clinic_id = uuid.uuid4()
    streams: list[list[EventEnvelope]] = []
    for i in range(60):
        stream = uuid.uuid4()
        events = [of(stream, 1, scheduled(clinic_id, 1 + i))]
        if i % 2:
            cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
            events.append(of(stream, 2, cancel))
        else:
            start = AppointmentStarted(clinic_id=clinic_id, started_by=STAFF, started_at=NOW)
            events.append(of(stream, 2, start))
        streams.append(events)
    expected = []
    for events in streams:
        row = None
        for event in events:
            _, row = project(row, event)
        expected.append(row)

    sequences: list[int] = []

    async def projector(seed: int, first_only: bool) -> None:
        """Deliver every stream in order (or only its first event, as a redelivery), in
        random batches, three times over."""
        rnd, visits = random.Random(seed), PostgresVisits(pool, CONSUMER)
        for _ in range(3):
            left = [list(events[:1] if first_only else events) for events in streams]
            delivery: list[EventEnvelope] = []
            while left:
                events = rnd.choice(left)
                delivery.append(events.pop(0))
                if not events:
                    left.remove(events)
            while delivery:
                size = rnd.randint(1, 40)
                batch, delivery = delivery[:size], delivery[size:]
                sequences.append(rnd.randint(1, 1000))
                outcomes = await visits.apply(batch, sequences[-1])
                assert set(outcomes) <= {Outcome.APPLIED, Outcome.DUPLICATE}

    # Projectors at once, some replaying old events (as a redelivery racing the first
    # delivery): a write folded from a stale read must never take a row back.
    await asyncio.gather(*(projector(seed, first_only=seed % 2 == 1) for seed in range(6)))
    rows = [row_of(record) for record in await view(pool)]
    assert rows == sorted(expected, key=lambda row: row.appointment_id)  # type: ignore[union-attr]
    assert await PostgresVisits(pool, CONSUMER).checkpoint() == max(sequences)
    assert await pool.fetchval("SELECT count(*) FROM projection_checkpoints") == 1


async def test_a_write_folded_from_a_stale_read_never_takes_a_row_back(
    pool: asyncpg.Pool,
) -> None:
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    first = of(stream, 1, scheduled(clinic_id))
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    _, v1 = project(None, first)
    _, v2 = project(v1, of(stream, 2, cancel))
    assert v2 is not None
    async with pool.acquire() as conn, conn.transaction():
        # Another projector wrote version 2 and has not committed yet...
        await conn.execute(upsert_statement("visits"), *upsert_args([v2]))
        # ... while a redelivery of version 1 reads the row (not there yet) and writes.
        replay = asyncio.create_task(PostgresVisits(pool, CONSUMER).apply([first], 1))
        # Its upsert waits for the other's row.
        await eventually(
            lambda: pool.fetchval(
                """SELECT count(*) > 0 FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'"""
            )
        )
        assert not replay.done()
    assert await replay == [Outcome.APPLIED]
    assert [row_of(record) for record in await view(pool)] == [v2]


async def test_the_lag_reads_the_last_event_handled_then_zero_once_caught_up(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    old = msgspec.structs.replace(of(stream, 1, scheduled(clinic_id)), occurred_at=an_hour_ago)
    await publish(nc, clinic_id, old)

    def lag() -> float | None:
        return REGISTRY.get_sample_value("clinic_projector_lag_seconds")

    async def lagging() -> bool:
        return (lag() or 0) >= 3590

    async def caught_up() -> bool:
        return lag() == 0

    async with running(pool, nc, run_projector):
        await eventually(lagging, within=30)  # the hour-old event handled
        for outcome in ("parked", "failed", "poison", "gap"):  # counted from 0, not absent
            assert (
                REGISTRY.get_sample_value("clinic_projector_events_total", {"outcome": outcome})
                is not None
            )
        await eventually(caught_up, within=30)  # and not left at an hour once caught up
    assert await pool.fetchval("SELECT count(*) FROM visits WHERE appointment_id = $1", stream)


async def test_retrying_leaves_no_task_behind(pool: asyncpg.Pool, nats_url: str) -> None:
    """Each retry of a projector that cannot reach JetStream waited on a new ``stop.wait()``
    task it never cancelled: ~720 more an hour through an outage."""
    closed = await nats.connect(nats_url)
    await closed.close()  # every attempt fails at once

    def waiting_on_stop() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if not task.done() and "Event.wait" in repr(task.get_coro())
        )

    stop = asyncio.Event()
    before = waiting_on_stop()
    projector = asyncio.create_task(VisitsProjector(pool, closed).run(stop))
    await asyncio.sleep(2.0)  # retries after 0.1, 0.2, 0.4, 0.8 s
    during = waiting_on_stop()
    stop.set()
    await asyncio.wait_for(projector, 10)
    assert during - before <= 1, (before, during)  # the one wait in progress at most


@pytest.mark.fault
@pytest.mark.parametrize("kind", ["event", "unreadable"])
async def test_a_projector_told_to_stop_while_the_database_refuses_hands_its_batch_back(
    pool: asyncpg.Pool, nc: NATS, database_url: str, kind: str
) -> None:
    """Kills dropping ``if stop.is_set(): return None`` from the retry of ``_apply``
    (``event``), and ``stop.is_set() or`` from the retry of ``_park`` (``unreadable``): a
    message waiting in place for PostgreSQL to accept writes again is handed back when the
    process stops, instead of holding the stop until the database comes back."""
    database = database_url.rsplit("/", 1)[1]
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    await pool.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    await pool.expire_connections()
    await publish(
        nc, clinic_id, of(stream, 1, scheduled(clinic_id)) if kind == "event" else b"\xff"
    )
    stop = asyncio.Event()
    projector = asyncio.create_task(run_projector(pool, nc, stop))
    try:

        async def held() -> bool:
            try:
                info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
            except NotFoundError:  # not created yet
                return False
            return bool(info.num_ack_pending == 1)

        await eventually(held, within=30)
        await asyncio.sleep(0.5)  # refused, retried in place
        stop.set()
        await asyncio.wait_for(asyncio.shield(projector), 5)
    finally:
        stop.set()
        await _writable(pool, database)
        await asyncio.wait_for(projector, 15)
    # Handed back (an event at once, a park after 5 s), not left to the ack wait (10 s and
    # more): the next projector settles it.
    done = "SELECT count(*) = 1 FROM " + ("visits" if kind == "event" else "parked_messages")
    began = time.monotonic()
    async with running(pool, nc, run_projector):
        await eventually(lambda: pool.fetchval(done), within=30)
    assert time.monotonic() - began < 9


@pytest.mark.fault
async def test_a_batch_narrowed_down_while_the_database_turns_away_hands_it_back_on_stop(
    pool: asyncpg.Pool, nc: NATS, database_url: str
) -> None:
    """Kills dropping ``if single is None: return None`` from the narrowing down of a
    failed batch in ``_apply``: a batch refused for one event's content is applied one by
    one; when the database then refuses for a reason that passes (read-only here) and the
    process is stopping, the whole batch is handed back, not lost to a ``TypeError``."""
    database = database_url.rsplit("/", 1)[1]
    clinic_id = uuid.uuid4()
    refused = msgspec.structs.replace(scheduled(clinic_id), visit_reason="a\u0000b")
    for event in (scheduled(clinic_id), refused, scheduled(clinic_id)):
        await publish(nc, clinic_id, of(uuid.uuid4(), 1, event))
    js = nc.jetstream()
    await js.add_consumer(EVENTS_STREAM, projector_module.consumer_config())
    subscription = await js.pull_subscribe_bind(CONSUMER, EVENTS_STREAM)
    try:
        msgs = await subscription.fetch(3, timeout=10)
        assert len(msgs) == 3
        # The batch's NUL is refused when its statement is bound, before read-only is
        # checked: each event alone then meets the read-only refusal.
        await pool.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await pool.expire_connections()
        stopping = asyncio.Event()
        stopping.set()
        await asyncio.wait_for(VisitsProjector(pool, nc).handle(msgs, stopping), 10)
        # All three handed back (nak): delivered again at once, not after the ack wait.
        again = await subscription.fetch(3, timeout=5)
        assert sorted(msg.metadata.num_delivered for msg in again) == [2, 2, 2]
        for msg in again:
            await msg.nak()
    finally:
        await subscription.unsubscribe()
        await _writable(pool, database)
    assert await pool.fetchval("SELECT count(*) FROM visits") == 0
    assert await pool.fetchval("SELECT count(*) FROM parked_messages") == 0


async def test_the_lag_stays_while_an_event_waits_to_be_delivered_again(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    """Kills dropping ``not info.num_ack_pending`` from the caught-up check of
    ``_consume``: an hour-old event waiting for the one before it (nak-ed, delivered again
    after a growing delay) leaves nothing pending, but is not applied: the lag stays an
    hour between its deliveries instead of reading 0 (caught up)."""
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    early = msgspec.structs.replace(of(stream, 2, cancel), occurred_at=an_hour_ago)
    await publish(nc, clinic_id, early, "cancelled")  # the store lacks it: it waits

    def lag() -> float:
        return REGISTRY.get_sample_value("clinic_projector_lag_seconds") or 0.0

    async def lagging() -> bool:
        return lag() >= 3590

    async with running(pool, nc, run_projector):
        await eventually(lagging, within=30)
        deadline = time.monotonic() + 5  # deliveries 0.5, 1 and 2 s apart, idle fetches
        while time.monotonic() < deadline:
            assert lag() >= 3590, "the lag read 0 while an event was still waiting"
            await asyncio.sleep(0.05)
    assert await pool.fetchval("SELECT count(*) FROM visits") == 0


async def test_the_back_off_of_an_event_waiting_for_an_earlier_one_is_capped(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    """Kills dropping the cap (``min(..., 30.0)``) of the nak delay in ``_settle``: an early
    event delivered for the 9th time comes back in 30 s, not in 0.5 * 2**8 = 128 s (the
    back-off of the consumer's own redeliveries stops at 120 s too)."""
    stream, clinic_id = uuid.uuid4(), uuid.uuid4()
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await publish(nc, clinic_id, of(stream, 2, cancel), "cancelled")  # the store lacks it
    js = nc.jetstream()
    await js.add_consumer(EVENTS_STREAM, projector_module.consumer_config())
    subscription = await js.pull_subscribe_bind(CONSUMER, EVENTS_STREAM)
    try:
        for _ in range(projector_module.PARK_AFTER - 2):  # delivered again at once
            (msg,) = await subscription.fetch(1, timeout=5)
            await msg.nak()
        (msg,) = await subscription.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == projector_module.PARK_AFTER - 1  # not parked yet
        delays: list[float | None] = []
        nak = msg.nak

        async def noted(delay: float | None = None) -> None:
            delays.append(delay)
            await nak(delay=delay)

        msg.nak = noted  # type: ignore[method-assign]
        await VisitsProjector(pool, nc).handle([msg], asyncio.Event())
        assert delays == [30.0]
    finally:
        await subscription.unsubscribe()
    assert await pool.fetchval("SELECT count(*) FROM parked_messages") == 0


@pytest.mark.fault
async def test_a_deadlock_is_retried_in_place_without_spending_a_delivery(
    pool: asyncpg.Pool, nc: NATS, database_url: str
) -> None:
    """Kills dropping ``or passing_refusal(exc)`` from the retry test of ``_apply``: a
    deadlock (SQLSTATE 40P01, which the adapter leaves as it is: another order of the
    writes may not meet it) is retried in place, like an outage, rather than taken for a
    message that cannot be applied (counted failed, nak-ed, delivered again)."""
    outcome = {"outcome": "failed"}
    failed = REGISTRY.get_sample_value("clinic_projector_events_total", outcome) or 0.0
    clinic_id, stream = uuid.uuid4(), uuid.uuid4()
    await PostgresVisits(pool).apply([of(stream, 1, scheduled(clinic_id))])
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await publish(nc, clinic_id, of(stream, 2, cancel), "cancelled")

    async def applying_waits() -> bool:
        return bool(
            await pool.fetchval(
                """SELECT count(*) > 0 FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'"""
            )
        )

    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SET deadlock_timeout = '60s'")  # the projector finds the cycle
        locking = other.transaction()
        await locking.start()
        # Holds the row the projector's apply will wait for...
        await other.execute("UPDATE visits SET version = version WHERE appointment_id = $1", stream)
        async with running(pool, nc, run_projector):
            await eventually(applying_waits, within=30)
            # ...and wants the table, which the apply's read holds: a deadlock.
            await asyncio.wait_for(other.execute("LOCK TABLE visits IN ACCESS EXCLUSIVE MODE"), 30)
            await locking.rollback()  # lets the retry through
            await eventually(
                lambda: pool.fetchval(
                    "SELECT version = 2 FROM visits WHERE appointment_id = $1", stream
                )
            )
            await eventually(lambda: consumer_idle(nc))
    finally:
        await other.close()
    info = await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
    assert info.num_redelivered == 0  # retried in place: no delivery spent
    assert (REGISTRY.get_sample_value("clinic_projector_events_total", outcome) or 0.0) == failed
