"""The PostgreSQL event store and the application service on it, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec
import pytest

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled
from services.appointments.adapters.postgres import migrate as migrate_module
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.migrate import migrate, migration_files
from services.appointments.adapters.system import new_uuid
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.handlers import Appointments, RequestContext
from services.appointments.service_layer.ports import (
    IdempotencyRecord,
    NewEvent,
    StoredAnswer,
    StreamVersionConflict,
)
from services.errors import ClinicError, SlotTaken
from tests.support.builders import principal, schedule_body
from tests.support.clock import ManualClock
from tests.support.locks import lock_waited_for


@pytest.fixture
def store(pool: asyncpg.Pool) -> PostgresEventStore:
    return PostgresEventStore(pool)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def app(store: PostgresEventStore, clock: ManualClock) -> Appointments:
    return Appointments(store, store, clock, new_uuid, Rules())


def scheduled(now: datetime, provider_id: uuid.UUID | None = None) -> AppointmentScheduled:
    return AppointmentScheduled(
        clinic_id=uuid.uuid4(),
        patient_id=uuid.uuid4(),
        provider_id=provider_id or uuid.uuid4(),
        starts_at=now + timedelta(hours=1),
        duration_minutes=30,
        timezone="UTC",
        scheduled_by=Actor(id=uuid.uuid4(), role="staff"),
    )


def new(event: AppointmentScheduled | AppointmentCancelled) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))


async def test_appended_events_load_back_in_order_with_envelopes(store: PostgresEventStore) -> None:
    stream = uuid.uuid4()
    first = scheduled(datetime.now(UTC))
    cancel = AppointmentCancelled(
        clinic_id=first.clinic_id, cancelled_by=first.scheduled_by, cancelled_at=datetime.now(UTC)
    )
    await store.append(stream, 0, [new(first)])
    result = await store.append(stream, 1, [new(cancel)])
    loaded = await store.load(stream)
    assert [r.event for r in loaded] == [first, cancel]
    assert [r.envelope.stream_version for r in loaded] == [1, 2]
    assert loaded[1].envelope.global_position == result.global_position
    assert loaded[0].envelope.global_position < loaded[1].envelope.global_position
    assert await store.load(uuid.uuid4()) == []


async def test_append_at_a_stale_version_is_a_conflict(store: PostgresEventStore) -> None:
    stream = uuid.uuid4()
    await store.append(stream, 0, [new(scheduled(datetime.now(UTC)))])
    with pytest.raises(StreamVersionConflict):
        await store.append(stream, 0, [new(scheduled(datetime.now(UTC)))])
    assert len(await store.load(stream)) == 1


async def test_every_append_writes_its_outbox_rows_in_the_same_transaction(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    for _ in range(3):
        await store.append(uuid.uuid4(), 0, [new(scheduled(datetime.now(UTC)))])
    positions = await pool.fetch("SELECT global_position FROM events ORDER BY 1")
    queued = await pool.fetch("SELECT global_position FROM outbox ORDER BY 1")
    assert positions == queued


async def test_overlapping_booking_of_one_provider_is_slot_taken(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    now = datetime.now(UTC)
    provider = uuid.uuid4()
    first = scheduled(now, provider)
    await store.append(uuid.uuid4(), 0, [new(first)])
    clash = msgspec_replace(first, starts_at=first.starts_at + timedelta(minutes=29))
    with pytest.raises(SlotTaken):
        await store.append(uuid.uuid4(), 0, [new(clash)])
    # Back to back is fine: the range is half-open.
    after = msgspec_replace(first, starts_at=first.starts_at + timedelta(minutes=30))
    await store.append(uuid.uuid4(), 0, [new(after)])
    assert await pool.fetchval("SELECT count(*) FROM events") == 2
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 2


async def test_the_double_booking_guard_stays_within_the_clinic(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    """Nothing crosses clinics (domain.md): a provider id another clinic books at the same
    time is that clinic's business, and refusing it would tell one tenant of another's
    bookings."""
    now = datetime.now(UTC)
    first = scheduled(now)
    await store.append(uuid.uuid4(), 0, [new(first)])
    elsewhere = msgspec_replace(first, clinic_id=uuid.uuid4())
    await store.append(uuid.uuid4(), 0, [new(elsewhere)])
    assert await pool.fetchval("SELECT count(*) FROM provider_bookings") == 2


async def test_cancel_frees_the_providers_slot(app: Appointments, clock: ManualClock) -> None:
    staff = principal("staff")
    ctx = RequestContext(principal=staff)
    body = schedule_body(clock.now)
    first = await app.schedule(ctx, body)
    with pytest.raises(SlotTaken):
        await app.schedule(ctx, schedule_body(clock.now, provider_id=body.provider_id))
    await app.cancel(ctx, first.view.appointment_id)
    again = await app.schedule(ctx, schedule_body(clock.now, provider_id=body.provider_id))
    assert again.created


async def test_migrations_are_safe_to_run_concurrently_and_again(pg_server_url: str) -> None:
    name = f"clinic_migrate_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')  # empty: not the migrated template
    try:
        dsn = urlunsplit(urlsplit(pg_server_url)._replace(path=f"/{name}"))
        results = await asyncio.gather(*(migrate(dsn) for _ in range(4)))
        everything = [file for file, _ in migration_files()]
        assert sorted(results) == [[], [], [], everything]  # one applied them all, in order
        assert await migrate(dsn) == []
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


_NEXT_MIGRATION = ("9999_events_note.sql", "ALTER TABLE events ADD COLUMN note text;")


async def test_a_migration_behind_a_long_transaction_lets_appends_through_until_it_can_run(
    store: PostgresEventStore,
    pool: asyncpg.Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ``ALTER TABLE`` waits for every transaction that touched the table: appends
    queued behind it would wait as long. It waits 1 s at a time; they pass between."""
    shipped = migration_files()
    monkeypatch.setattr(migrate_module, "migration_files", lambda: [*shipped, _NEXT_MIGRATION])
    report = await asyncpg.connect(database_url)
    try:
        async with report.transaction():
            await report.fetch("SELECT * FROM events LIMIT 1")  # a long read of the table
            migrating = asyncio.create_task(migrate(database_url))
            for _ in range(200):
                if await lock_waited_for(pool, "events"):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the migration never waited for its lock")
            await asyncio.wait_for(
                store.append(uuid.uuid4(), 0, [new(scheduled(datetime.now(UTC)))]), 10
            )
            assert not migrating.done()
    finally:
        await report.close()
    assert await asyncio.wait_for(migrating, 30) == [_NEXT_MIGRATION[0]]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE note IS NULL") == 1


async def test_a_migration_that_never_gets_its_lock_fails_having_applied_nothing(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migration_files()
    monkeypatch.setattr(migrate_module, "migration_files", lambda: [*shipped, _NEXT_MIGRATION])
    monkeypatch.setattr(migrate_module, "LOCK_ATTEMPTS", 2)
    monkeypatch.setattr(migrate_module, "LOCK_TIMEOUT", "100ms")
    report = await asyncpg.connect(database_url)
    try:
        async with report.transaction():
            await report.fetch("SELECT * FROM events LIMIT 1")
            with pytest.raises(TimeoutError, match=r"9999_events_note\.sql could not lock"):
                await asyncio.wait_for(migrate(database_url), 30)
    finally:
        await report.close()
    columns = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'events'"
    assert await pool.fetchval(columns + " AND column_name = 'note'") == 0
    assert not await pool.fetchval(
        "SELECT count(*) FROM schema_migrations WHERE name = $1", _NEXT_MIGRATION[0]
    )
    assert await migrate(database_url) == [_NEXT_MIGRATION[0]]  # once the table is free


async def test_old_schema_version_events_are_upcast_on_load(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    stream, clinic = uuid.uuid4(), uuid.uuid4()
    v1 = msgspec.json.encode(
        {  # as written before visit reasons existed: no visit_reason key
            "clinic_id": str(clinic),
            "patient_id": str(uuid.uuid4()),
            "provider_id": str(uuid.uuid4()),
            "starts_at": "2030-01-01T10:00:00Z",
            "duration_minutes": 20,
            "timezone": "UTC",
            "scheduled_by": {"id": str(uuid.uuid4()), "role": "staff"},
        }
    ).decode()
    await pool.execute(
        """INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type,
                               schema_version, data, occurred_at)
           VALUES ($1, $2, 1, $3, 'AppointmentScheduled', 1, $4::jsonb, now())""",
        uuid.uuid4(),
        stream,
        clinic,
        v1,
    )
    [recorded] = await store.load(stream)
    assert isinstance(recorded.event, AppointmentScheduled)
    assert recorded.event.visit_reason is None
    assert recorded.event.duration_minutes == 20


async def test_100_concurrent_cancels_record_exactly_one_cancellation(
    app: Appointments, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    staff = principal("staff")
    ctx = RequestContext(principal=staff)
    created = await app.schedule(ctx, schedule_body(clock.now))
    appointment_id = created.view.appointment_id

    results = await asyncio.gather(
        *(app.cancel(ctx, appointment_id, reason=f"r{i}") for i in range(100)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert all(r.view.status == "cancelled" for r in results if not isinstance(r, BaseException))
    count = await pool.fetchval(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'AppointmentCancelled'",
        appointment_id,
    )
    assert count == 1


async def test_concurrent_cancels_and_starts_produce_one_terminal_event(
    app: Appointments, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    ctx = RequestContext(principal=principal("staff"))
    created = await app.schedule(ctx, schedule_body(clock.now, starts_in=timedelta(minutes=5)))
    appointment_id = created.view.appointment_id
    commands = [
        app.cancel(ctx, appointment_id) if i % 2 else app.start(ctx, appointment_id)
        for i in range(60)
    ]
    results = await asyncio.gather(*commands, return_exceptions=True)
    assert all(isinstance(r, ClinicError) or not isinstance(r, BaseException) for r in results)
    terminal = await pool.fetchval(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND stream_version > 1", appointment_id
    )
    assert terminal == 1


async def test_25_concurrent_bookings_of_one_slot_have_exactly_one_winner(
    app: Appointments, pool: asyncpg.Pool, clock: ManualClock
) -> None:
    clinic = uuid.uuid4()
    provider = uuid.uuid4()
    ctx = RequestContext(principal=principal("staff", clinic))
    bodies = [
        schedule_body(clock.now, provider_id=provider, starts_in=timedelta(hours=3, minutes=i))
        for i in range(25)
    ]
    results = await asyncio.gather(
        *(app.schedule(ctx, body) for body in bodies), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, SlotTaken) for r in losers)
    assert await pool.fetchval("SELECT count(*) FROM events") == 1


def msgspec_replace(event: AppointmentScheduled, **changes: object) -> AppointmentScheduled:
    return msgspec.structs.replace(event, **changes)


async def test_saving_an_answer_under_a_key_a_twin_is_committing_returns_the_twins(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    owner, key = uuid.uuid4(), "k-1"
    twins = StoredAnswer(fingerprint="a", status=200, body=b"{}", consistency_token="t.2")
    mine = StoredAnswer(fingerprint="b", status=200, body=b"[]", consistency_token="u.2")
    async with pool.acquire() as twin:
        transaction = twin.transaction()
        await transaction.start()
        await twin.execute(
            """INSERT INTO idempotency_keys
                   (principal_id, key, fingerprint, status, body, consistency_token)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            owner,
            key,
            twins.fingerprint,
            twins.status,
            twins.body,
            twins.consistency_token,
        )
        saving = asyncio.create_task(
            store.save_answer(IdempotencyRecord(principal_id=owner, key=key, answer=mine))
        )

        async def waits_on_the_twin() -> bool:
            waiting: int = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%idempotency_keys%'"
            )
            return waiting > 0

        deadline = asyncio.get_running_loop().time() + 10
        while not await waits_on_the_twin():
            assert asyncio.get_running_loop().time() < deadline, "save_answer never waited"
            await asyncio.sleep(0.01)
        await transaction.commit()
    assert await saving == twins


async def test_an_append_of_no_event_is_refused_and_writes_nothing(
    store: PostgresEventStore, pool: asyncpg.Pool
) -> None:
    stream = uuid.uuid4()
    with pytest.raises(ValueError, match="at least one event"):
        await store.append(stream, 0, [])
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", stream) == 0
