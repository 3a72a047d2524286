"""The visits query against real PostgreSQL: Upcoming and Past at the clock's now, statuses
and flags from the commands' rules, role scoping, keyset pages, read-your-writes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from contracts.commands import VisitsTab
from contracts.common import Actor, Principal
from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
    event_data,
    event_type,
)
from contracts.views import VisitView
from services.appointments.adapters.postgres import visits as visits_adapter
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.visits import PostgresVisits, ViewUpdates, page_query
from services.appointments.domain.rules import Rules
from services.appointments.service_layer.ports import NewEvent
from services.appointments.service_layer.visits import Outcome, PageKey, Scope, VisitsQuery
from services.errors import InvalidRequest
from tests.support.clock import ManualClock

NOW = datetime(2030, 3, 14, 15, 0, tzinfo=UTC)
STAFF = Actor(id=uuid.uuid4(), role="staff")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
def visits(pool: asyncpg.Pool) -> PostgresVisits:
    return PostgresVisits(pool)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def query(visits: PostgresVisits, clock: ManualClock) -> VisitsQuery:
    return VisitsQuery(visits, clock, Rules(), timedelta(seconds=5))


CLINIC = uuid.uuid4()
PATIENT = Principal(id=uuid.uuid4(), role="patient", clinic_id=CLINIC)
PROVIDER = Principal(id=uuid.uuid4(), role="provider", clinic_id=CLINIC)


def env(stream: uuid.UUID, version: int, event: Event) -> EventEnvelope:
    type_ = event_type(event)
    return EventEnvelope(
        event_id=uuid.uuid4(),
        type=type_,
        schema_version=2 if type_ == "AppointmentScheduled" else 1,
        stream_id=stream,
        stream_version=version,
        global_position=0,
        occurred_at=NOW,
        data=event_data(event),
    )


def cancel(stream: uuid.UUID, clinic: uuid.UUID = CLINIC) -> EventEnvelope:
    """The staff's cancellation of ``stream`` (its second event)."""
    return env(
        stream, 2, AppointmentCancelled(clinic_id=clinic, cancelled_by=STAFF, cancelled_at=NOW)
    )


async def book(
    visits: PostgresVisits,
    starts_in: timedelta,
    then: str | None = None,
    patient: uuid.UUID = PATIENT.id,
    provider: uuid.UUID = PROVIDER.id,
    clinic: uuid.UUID = CLINIC,
    minutes: int = 30,
) -> uuid.UUID:
    """Project a scheduled visit (then cancelled or started); its appointment id."""
    stream = uuid.uuid4()
    booked = AppointmentScheduled(
        clinic_id=clinic,
        patient_id=patient,
        provider_id=provider,
        starts_at=NOW + starts_in,
        duration_minutes=minutes,
        timezone="Europe/Berlin",
        visit_reason="follow-up",
        scheduled_by=STAFF,
    )
    events = [env(stream, 1, booked)]
    if then == "cancelled":
        events.append(cancel(stream, clinic))
    elif then == "started":
        events.append(
            env(stream, 2, AppointmentStarted(clinic_id=clinic, started_by=STAFF, started_at=NOW))
        )
    await visits.apply(events)
    return stream


async def ids(query: VisitsQuery, who: Principal, tab: VisitsTab = "upcoming") -> list[uuid.UUID]:
    page, _ = await query.list_visits(who, tab, limit=100)
    return [item.appointment_id for item in page.items]


async def test_upcoming_is_soonest_first_and_past_most_recent_first_with_statuses(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    later = await book(visits, timedelta(hours=1))
    soon = await book(visits, timedelta(minutes=10))
    ongoing = await book(visits, timedelta(minutes=-10), "started")
    missed = await book(visits, timedelta(hours=-2))
    completed = await book(visits, timedelta(hours=-3), "started")
    cancelled_ahead = await book(visits, timedelta(hours=2), "cancelled")
    cancelled_before = await book(visits, timedelta(days=-1), "cancelled")

    upcoming, stale = await query.list_visits(PATIENT, "upcoming")
    assert not stale
    assert [v.appointment_id for v in upcoming.items] == [ongoing, soon, later]
    assert [v.status for v in upcoming.items] == ["started", "scheduled", "scheduled"]
    past, _ = await query.list_visits(PATIENT, "past")
    assert [v.appointment_id for v in past.items] == [
        cancelled_ahead,
        missed,
        completed,
        cancelled_before,
    ]
    assert [v.status for v in past.items] == ["cancelled", "missed", "completed", "cancelled"]
    assert upcoming.next_cursor is None and past.next_cursor is None


async def test_flags_follow_the_rules_of_the_commands(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    later = await book(visits, timedelta(hours=1))
    soon = await book(visits, timedelta(minutes=10))
    ongoing = await book(visits, timedelta(minutes=-10), "started")
    page, _ = await query.list_visits(PATIENT)
    flags = {v.appointment_id: (v.can_cancel, v.can_start) for v in page.items}
    # An ongoing started visit can be started again: the patient rejoins.
    assert flags == {later: (True, False), soon: (True, True), ongoing: (False, True)}
    first: VisitView = page.items[-1]
    assert first.start_window_opens_at == NOW + timedelta(minutes=45)
    assert first.ends_at == NOW + timedelta(hours=1, minutes=30)
    assert (first.timezone, first.visit_reason) == ("Europe/Berlin", "follow-up")


async def test_a_visit_moves_to_past_when_it_ends_or_is_cancelled(
    visits: PostgresVisits, query: VisitsQuery, clock: ManualClock
) -> None:
    visit = await book(visits, timedelta(minutes=10))
    clock.advance(minutes=39)
    assert await ids(query, PATIENT) == [visit]
    clock.advance(minutes=1)  # its end: not upcoming any more
    assert await ids(query, PATIENT) == []
    page, _ = await query.list_visits(PATIENT, "past")
    assert [(v.appointment_id, v.status) for v in page.items] == [(visit, "missed")]


@pytest.mark.parametrize("tab", ["upcoming", "past"])
async def test_pages_are_whole_with_a_visit_ending_at_this_very_moment(
    visits: PostgresVisits, query: VisitsQuery, clock: ManualClock, tab: VisitsTab
) -> None:
    # The SQL picks each tab's rows by the same edge as the rules (a visit ending now is
    # past): a page one row short would lose its cursor, and the rest of the tab with it.
    ending = await book(visits, timedelta(minutes=-30))  # 30 minutes long: ends at NOW
    later = [await book(visits, timedelta(hours=h)) for h in (1, 2)]
    earlier = [await book(visits, timedelta(hours=-h)) for h in (2, 3)]
    clock.now = NOW
    expected = later if tab == "upcoming" else [ending, *earlier]
    assert await walk(query, tab, 1) == expected


async def test_each_role_sees_only_its_scope(visits: PostgresVisits, query: VisitsQuery) -> None:
    mine = await book(visits, timedelta(hours=1))
    other_patient = await book(visits, timedelta(hours=2), patient=uuid.uuid4())
    other_provider = await book(visits, timedelta(hours=3), provider=uuid.uuid4())
    await book(
        visits, timedelta(hours=4), clinic=uuid.uuid4(), patient=PATIENT.id, provider=PROVIDER.id
    )
    staff = Principal(id=uuid.uuid4(), role="staff", clinic_id=CLINIC)
    assert await ids(query, PATIENT) == [mine, other_provider]
    assert await ids(query, PROVIDER) == [mine, other_patient]
    assert await ids(query, staff) == [mine, other_patient, other_provider]
    stranger = Principal(id=uuid.uuid4(), role="staff", clinic_id=uuid.uuid4())
    assert await ids(query, stranger) == []


async def walk(
    query: VisitsQuery, tab: VisitsTab, limit: int, between: object = None
) -> list[uuid.UUID]:
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page, _ = await query.list_visits(PATIENT, tab, limit=limit, cursor=cursor)
        assert len(page.items) <= limit
        seen += [item.appointment_id for item in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
        if callable(between):
            await between()


@pytest.mark.parametrize("tab", ["upcoming", "past"])
async def test_pages_cover_the_tab_once_even_with_equal_start_times(
    visits: PostgresVisits, query: VisitsQuery, tab: VisitsTab
) -> None:
    for i in range(24):
        sign = 1 if tab == "upcoming" else -1
        await book(
            visits,
            sign * timedelta(hours=1 + i // 3),
            "cancelled" if tab == "past" and i % 2 else None,
        )
    everything = await ids(query, PATIENT, tab)
    assert len(everything) == 24
    for limit in (1, 5, 7, 24, 100):
        assert await walk(query, tab, limit) == everything


@pytest.mark.parametrize("tab", ["upcoming", "past"])
async def test_pages_keep_the_keyset_order_whatever_plan_reads_them(
    database_url: str, tab: VisitsTab
) -> None:
    """Kills dropping ``appointment_id`` from a tab's ORDER BY: the keyset cursor is
    (starts_at, appointment_id), so the SQL must sort by both. With an index range the
    rows come out in that order anyway; a plan without one (a small clinic, a seq scan and
    a sort) returns visits that start at once in any order, and pages skip or repeat them."""
    no_index = {"enable_indexscan": "off", "enable_bitmapscan": "off"}
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, server_settings=no_index)
    try:
        visits = PostgresVisits(pool)
        query = VisitsQuery(visits, ManualClock(NOW), Rules(), timedelta(seconds=5))
        at = timedelta(hours=1) if tab == "upcoming" else -timedelta(hours=1)
        booked = [await book(visits, at) for _ in range(30)]
        assert await walk(query, tab, 4) == sorted(booked, reverse=tab == "past")
    finally:
        await pool.close()


async def test_pages_stay_stable_while_visits_are_added(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    for hours in range(1, 11):
        await book(visits, timedelta(hours=hours))
    before = await ids(query, PATIENT)
    added: list[uuid.UUID] = []

    async def insert_both_sides() -> None:
        added.append(await book(visits, timedelta(minutes=30)))  # before any cursor
        added.append(await book(visits, timedelta(hours=20)))  # after every cursor

    seen = await walk(query, "upcoming", 3, insert_both_sides)
    assert len(seen) == len(set(seen))
    assert set(before) <= set(seen)
    assert [visit for visit in seen if visit in before] == before
    assert added[0] not in seen and added[1] in seen


async def test_bad_cursors_and_limits_are_invalid_requests(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    for _ in range(3):
        await book(visits, timedelta(hours=1))
    page, _ = await query.list_visits(PATIENT, "upcoming", limit=1)
    assert page.next_cursor is not None
    for cursor in ("not-a-cursor", "e30", page.next_cursor[:-3]):
        with pytest.raises(InvalidRequest):
            await query.list_visits(PATIENT, "upcoming", cursor=cursor)
    with pytest.raises(InvalidRequest):
        await query.list_visits(PATIENT, "past", cursor=page.next_cursor)
    for limit in (0, 101):
        with pytest.raises(InvalidRequest):
            await query.list_visits(PATIENT, limit=limit)
    with pytest.raises(InvalidRequest):
        await query.list_visits(PATIENT, consistency_token="garbage")


async def test_a_consistency_token_waits_for_the_write(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    stream = await book(visits, timedelta(hours=1))
    cancellation = cancel(stream)

    async def project_later() -> None:
        await asyncio.sleep(0.3)
        await visits.apply([cancellation])

    later = asyncio.create_task(project_later())
    page, stale = await query.list_visits(PATIENT, "upcoming", consistency_token=f"{stream}.2")
    await later
    assert not stale
    assert page.items == []
    past, stale = await query.list_visits(PATIENT, "past", consistency_token=f"{stream}.2")
    assert not stale and [v.status for v in past.items] == ["cancelled"]


async def test_a_consistency_token_not_reached_in_time_answers_stale(
    visits: PostgresVisits, clock: ManualClock
) -> None:
    stream = await book(visits, timedelta(hours=1))
    query = VisitsQuery(visits, clock, Rules(), timedelta(milliseconds=200))
    loop = asyncio.get_running_loop()
    started = loop.time()
    page, stale = await query.list_visits(PATIENT, consistency_token=f"{stream}.2")
    assert stale
    assert 0.2 <= loop.time() - started < 10  # its wait, not less
    assert [v.appointment_id for v in page.items] == [stream]
    _, stale = await query.list_visits(PATIENT, consistency_token=f"{uuid.uuid4()}.1")
    assert stale


async def test_a_token_at_version_0_asks_for_nothing_and_never_waits(
    visits: PostgresVisits, query: VisitsQuery
) -> None:
    """Kills dropping ``version <= 0 or`` in ``PostgresVisits.wait_for_version``: a token
    at version 0 (a stream before its first write) is reflected by any view, the row there
    or not; it neither waits out the consistency wait (5 s here) nor answers stale."""
    stream = await book(visits, timedelta(hours=1))
    loop = asyncio.get_running_loop()
    for token in (f"{uuid.uuid4()}.0", f"{stream}.0"):
        started = loop.time()
        page, stale = await query.list_visits(PATIENT, consistency_token=token)
        assert not stale and [v.appointment_id for v in page.items] == [stream]
        assert loop.time() - started < 2
    other = Scope(clinic_id=CLINIC, patient_id=uuid.uuid4())  # not the reader's either
    assert await visits.wait_for_version(other, stream, 0, wait_seconds=5)


async def test_every_page_query_reads_one_index_range_at_scale(pool: asyncpg.Pool) -> None:
    # 200,000 visits in one clinic: 2,000 patients with 100 visits each over two years.
    await pool.execute(
        """INSERT INTO visits (appointment_id, clinic_id, patient_id, provider_id, starts_at,
               ends_at, duration_minutes, timezone, status, version)
           SELECT gen_random_uuid(), $1, lpad(to_hex(p), 32, '0')::uuid, gen_random_uuid(),
                  at, at + interval '30 min', 30, 'UTC',
                  CASE WHEN v % 5 = 0 THEN 'cancelled' ELSE 'scheduled' END, 1
           FROM generate_series(1, 2000) p, generate_series(1, 100) v,
                LATERAL (SELECT $2::timestamptz + (v * 7 - 350) * interval '1 day'
                                + p * interval '1 min' AS at) AS t""",
        CLINIC,
        NOW,
    )
    await pool.execute("ANALYZE visits")
    patient = uuid.UUID(int=42)
    scopes = [Scope(clinic_id=CLINIC, patient_id=patient), Scope(clinic_id=CLINIC)]
    for scope in scopes:
        for tab in ("upcoming", "past"):
            afters = [None, PageKey(tab, NOW, uuid.UUID(int=0))]
            if tab == "upcoming":
                # A cursor of a page left open for days: the range still starts at the
                # first visit not ended (kills dropping ``> low`` from ``page_query``).
                afters.append(PageKey(tab, NOW - timedelta(days=300), uuid.UUID(int=0)))
            for after in afters:
                sql, args = page_query(scope, tab, NOW, after, 21)  # type: ignore[arg-type]
                plan = json.loads(
                    await pool.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
                )
                top = plan[0]["Plan"]
                assert "Seq Scan" not in json.dumps(plan), (scope, tab)
                assert top["Actual Rows"] == 21
                assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] < 150, (scope, tab, top)


class CountingPolls:
    """The pool, passed through; counts the version polls of read-your-writes waits, so a
    test can write only once a wait has looked and found its version missing."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.polled = asyncio.Event()
        self.polls = 0

    async def fetchval(self, query: str, *args: Any) -> Any:
        value = await self.pool.fetchval(query, *args)
        if query.startswith("SELECT version FROM visits"):
            self.polls += 1
            self.polled.set()
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def polled_once(counting: CountingPolls) -> None:
    await asyncio.wait_for(counting.polled.wait(), 30)


async def test_the_projector_of_this_process_wakes_a_waiting_read(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = ViewUpdates()
    counting = CountingPolls(pool)
    reader = PostgresVisits(counting, updates=updates)  # type: ignore[arg-type]
    projector = PostgresVisits(pool, updates=updates)
    stream = await book(projector, timedelta(hours=1))
    cancellation = cancel(stream)
    # Polling alone would look again only in an hour: only the wake-up can end the wait.
    monkeypatch.setattr(visits_adapter, "_WAIT_POLL_FIRST", 3600.0)
    waiting = asyncio.create_task(
        reader.wait_for_version(Scope.of(PATIENT), stream, 2, wait_seconds=7200)
    )
    await polled_once(counting)  # it looked, found version 1, and waits
    assert not waiting.done()
    with updates.watch(stream) as written:
        await projector.apply([cancellation])
        assert written.is_set()
        written.clear()
        await projector.apply([cancellation])  # a duplicate writes nothing, wakes nobody
        assert not written.is_set()
    assert await asyncio.wait_for(waiting, 30)


async def test_a_write_short_of_the_version_wakes_a_waiting_read_once(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills dropping ``written.clear()`` from ``wait_for_version``: a write of the row
    that is not yet the version waited for wakes the wait for one look, after which it
    pauses again, rather than leaving it woken and polling the view without a pause until
    its time runs out."""
    updates = ViewUpdates()
    counting = CountingPolls(pool)
    reader = PostgresVisits(counting, updates=updates)  # type: ignore[arg-type]
    projector = PostgresVisits(pool, updates=updates)
    stream = await book(projector, timedelta(hours=1))
    for pause in ("_WAIT_POLL_FIRST", "_WAIT_POLL_MAX"):  # only a wake-up polls, and the end
        monkeypatch.setattr(visits_adapter, pause, 3600.0)
    waiting = asyncio.create_task(
        reader.wait_for_version(Scope.of(PATIENT), stream, 3, wait_seconds=1.0)
    )
    await polled_once(counting)
    await projector.apply([cancel(stream)])  # version 2 of the 3 waited for
    assert not await asyncio.wait_for(waiting, 30)
    # The first look, the wake-up's and the last (a timer may fire a hair early: one more).
    assert counting.polls <= 4, counting.polls


async def test_a_read_waits_by_polling_for_a_projector_of_another_process(
    pool: asyncpg.Pool,
) -> None:
    reader = PostgresVisits(pool, updates=ViewUpdates())
    projector = PostgresVisits(pool, updates=ViewUpdates())  # another process's
    stream = await book(projector, timedelta(hours=1))
    cancellation = cancel(stream)

    async def project_later() -> None:
        await asyncio.sleep(0.3)
        await projector.apply([cancellation])

    later = asyncio.create_task(project_later())
    assert await reader.wait_for_version(Scope.of(PATIENT), stream, 2, wait_seconds=30)
    await later
    # Outside the reader's scope it never shows, and the wait ends with the time given.
    other = Scope(clinic_id=CLINIC, patient_id=uuid.uuid4())
    assert not await reader.wait_for_version(other, stream, 2, wait_seconds=0.1)


@pytest.mark.parametrize("updates", [None, ViewUpdates()])
async def test_a_wait_ends_on_time_whatever_its_poll_interval(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, updates: ViewUpdates | None
) -> None:
    """Kills ``step = pause`` (for ``min(pause, deadline - now)``) in ``wait_for_version``:
    a pause between polls never runs past the wait's own deadline (the read's deadline
    leaves its last look 50 ms; one overslept is cut mid-query)."""
    reader = PostgresVisits(pool, updates=updates)
    stream = await book(reader, timedelta(hours=1))
    monkeypatch.setattr(visits_adapter, "_WAIT_POLL_FIRST", 3600.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = reader.wait_for_version(Scope.of(PATIENT), stream, 2, wait_seconds=0.2)
    assert not await asyncio.wait_for(waiting, 10)
    assert 0.2 <= loop.time() - started < 5


async def test_repaired_rows_never_go_back_and_wake_a_waiting_read(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = ViewUpdates()
    view = PostgresVisits(pool, updates=updates)
    counting = CountingPolls(pool)
    reader = PostgresVisits(counting, updates=updates)  # type: ignore[arg-type]
    streams = [await book(view, timedelta(hours=1 + i)) for i in range(20)]
    rows = {stream: await view.get(stream) for stream in streams}
    cancelled = {
        stream: msgspec.structs.replace(row, status="cancelled", version=2)
        for stream, row in rows.items()
        if row is not None
    }
    monkeypatch.setattr(visits_adapter, "_WAIT_POLL_FIRST", 3600.0)  # only a wake-up ends it
    waiting = asyncio.create_task(
        reader.wait_for_version(Scope.of(PATIENT), streams[0], 2, wait_seconds=7200)
    )
    await polled_once(counting)
    assert not waiting.done()
    # Concurrent writes (coalesced into statements), each row's older version racing it.
    writes = [view.write_row(row) for row in cancelled.values()]
    writes += [view.write_row(row) for row in rows.values() if row is not None]
    await asyncio.gather(*writes)
    assert await asyncio.wait_for(waiting, 30)
    for stream, row in cancelled.items():
        assert await view.get(stream) == row
    # The projector folding the same event later finds it applied.
    cancellation = cancel(streams[0])
    assert await view.apply([cancellation]) == [Outcome.DUPLICATE]


async def test_a_repaired_row_commits_without_waiting_for_the_wal_flush(
    pool: asyncpg.Pool,
) -> None:
    """The statement relaxes ``synchronous_commit`` for its own transaction: seen here
    inside an explicit one, where the setting outlives the statement until the commit.
    (That its implicit commit then skips the flush was checked with ``pg_stat_wal``:
    200 repaired rows, 3 WAL syncs; 200 durable upserts, 200.)"""
    view = PostgresVisits(pool)
    row = await view.get(await book(view, timedelta(hours=1)))
    assert row is not None
    async with pool.acquire() as conn:
        await conn.execute("SET synchronous_commit = on")  # the test server's is off
        async with conn.transaction():
            # Inside a transaction the statement's setting outlives it: it did take effect.
            await conn.execute(
                visits_adapter._WRITE_ROW,
                *visits_adapter.upsert_args([msgspec.structs.replace(row, version=2)]),
            )
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"  # for that one only
        await conn.execute("RESET synchronous_commit")
    assert (await view.get(row.appointment_id)) == msgspec.structs.replace(row, version=2)


async def test_a_row_the_database_refuses_fails_alone_among_concurrent_repairs(
    pool: asyncpg.Pool,
) -> None:
    view = PostgresVisits(pool)
    rows = [await view.get(await book(view, timedelta(hours=1 + i))) for i in range(12)]
    cancelled = [msgspec.structs.replace(r, status="cancelled", version=2) for r in rows if r]
    bad = msgspec.structs.replace(cancelled[5], version=0)  # breaks CHECK (version > 0)
    results = await asyncio.gather(
        *(view.write_row(row) for row in [*cancelled[:5], bad, *cancelled[6:]]),
        return_exceptions=True,
    )
    assert [type(r) for r in results].count(asyncpg.CheckViolationError) == 1
    assert isinstance(results[5], asyncpg.CheckViolationError)
    for row in cancelled[:5] + cancelled[6:]:
        assert await view.get(row.appointment_id) == row


async def test_a_read_repairs_a_stream_holding_an_event_type_of_a_newer_release(
    pool: asyncpg.Pool,
) -> None:
    """A rolling upgrade: a newer release stored an event type this one does not know. The
    read repair folds the row as the projector does (the version moves past the unknown
    event), instead of failing to decode the stream and answering stale."""
    store, view = PostgresEventStore(pool), PostgresVisits(pool)
    clinic, patient, stream = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    staff = Actor(id=uuid.uuid4(), role="staff")
    booked = AppointmentScheduled(
        clinic_id=clinic,
        patient_id=patient,
        provider_id=uuid.uuid4(),
        starts_at=now + timedelta(days=2),
        duration_minutes=30,
        timezone="UTC",
        scheduled_by=staff,
    )
    await store.append(stream, 0, [NewEvent(event_id=uuid.uuid4(), event=booked, occurred_at=now)])
    await pool.execute(
        "INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type,"
        " schema_version, data, occurred_at) VALUES ($1, $2, 2, $3, 'AppointmentNoteAdded', 1,"
        " $4::jsonb, now())",
        uuid.uuid4(),
        stream,
        clinic,
        json.dumps({"clinic_id": str(clinic), "note": "bring your test results"}),
    )
    cancel = AppointmentCancelled(clinic_id=clinic, cancelled_by=staff, cancelled_at=now)
    await store.append(stream, 2, [NewEvent(event_id=uuid.uuid4(), event=cancel, occurred_at=now)])
    query = VisitsQuery(
        view, lambda: datetime.now(UTC), Rules(), timedelta(seconds=2), repair=(store, view)
    )
    patient_principal = Principal(id=patient, role="patient", clinic_id=clinic)
    upcoming, stale = await query.list_visits(patient_principal, consistency_token=f"{stream}.3")
    assert not stale and upcoming.items == []
    past, _ = await query.list_visits(patient_principal, "past")
    assert [(v.appointment_id, v.status) for v in past.items] == [(stream, "cancelled")]
