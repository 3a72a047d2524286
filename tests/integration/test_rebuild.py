"""Rebuilding the visits view from the event store, while the relay and projector run."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import nats
import pytest

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled, AppointmentStarted, Event
from services.appointments import rebuild
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.migrate import MIGRATION_LOCK_ID
from services.appointments.adapters.postgres.visits import PostgresVisits
from services.appointments.projector import run_projector
from services.appointments.rebuild import (
    CHANGED,
    REBUILD_LOCK_ID,
    RebuildAlreadyRunning,
    StderrProgress,
    _watch,
    rebuild_visits,
)
from services.appointments.relay import run_relay
from services.appointments.service_layer.ports import NewEvent
from tests.support.locks import lock_waited_for
from tests.support.proxy import FreezingProxy

NOW = datetime.now(UTC).replace(microsecond=0)
STAFF = Actor(id=uuid.uuid4(), role="staff")


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def lifecycle(store: PostgresEventStore, clinic_id: uuid.UUID, i: int) -> uuid.UUID:
    """Schedule one appointment, then cancel or start it for two in three; its id."""
    stream = uuid.uuid4()
    booked = AppointmentScheduled(
        clinic_id=clinic_id,
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=NOW + timedelta(hours=1 + i),
        duration_minutes=45,
        timezone="Asia/Tokyo",
        scheduled_by=STAFF,
    )
    await store.append(stream, 0, [NewEvent(event_id=uuid.uuid4(), event=booked, occurred_at=NOW)])
    then: Event | None = None
    if i % 3 == 1:
        then = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    elif i % 3 == 2:
        then = AppointmentStarted(clinic_id=clinic_id, started_by=STAFF, started_at=NOW)
    if then is not None:
        await store.append(
            stream, 1, [NewEvent(event_id=uuid.uuid4(), event=then, occurred_at=NOW)]
        )
    return stream


async def view(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM visits ORDER BY appointment_id")


async def project_directly(pool: asyncpg.Pool, streams: list[uuid.UUID]) -> None:
    """Apply the streams' events the way the projector would (without NATS)."""
    store, visits = PostgresEventStore(pool), PostgresVisits(pool)
    for stream in streams:
        await visits.apply([recorded.envelope for recorded in await store.load(stream)])


async def caught_up(pool: asyncpg.Pool) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT (SELECT coalesce(sum(version), 0) FROM visits) = (SELECT count(*) FROM events)"
        )
    )


async def test_a_rebuild_during_load_leaves_the_view_equal_to_a_quiet_rebuild(
    pool: asyncpg.Pool, nats_url: str
) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    nc = await nats.connect(nats_url)
    stop, writing = asyncio.Event(), asyncio.Event()
    roles = [asyncio.create_task(run(pool, nc, stop)) for run in (run_relay, run_projector)]

    async def writer(offset: int) -> None:
        i = offset
        while writing.is_set():
            await lifecycle(store, clinic_id, i)
            i += 8

    try:
        for i in range(400):
            await lifecycle(store, clinic_id, i)
        writing.set()
        writers = [asyncio.create_task(writer(1000 + n)) for n in range(8)]
        counts = [await rebuild_visits(pool), await rebuild_visits(pool, batch_size=2)]
        writing.clear()
        await asyncio.gather(*writers)
        await eventually(lambda: caught_up(pool))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*roles), 15)
        await nc.close()
    live = await view(pool)
    appointments = await pool.fetchval("SELECT count(DISTINCT stream_id) FROM events")
    assert 400 <= counts[0] <= counts[1] <= appointments == len(live)
    assert await rebuild_visits(pool) == appointments
    assert await view(pool) == live


async def test_a_rebuild_repairs_a_damaged_view(pool: asyncpg.Pool) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    streams = [await lifecycle(store, clinic_id, i) for i in range(30)]
    await project_directly(pool, streams)
    healthy = await view(pool)
    await pool.execute(
        "UPDATE visits SET status = 'scheduled' WHERE appointment_id = $1", streams[1]
    )
    await pool.execute("UPDATE visits SET version = 99 WHERE appointment_id = $1", streams[2])
    await pool.execute("DELETE FROM visits WHERE appointment_id = $1", streams[3])
    await pool.execute(
        "INSERT INTO visits SELECT gen_random_uuid(), clinic_id, patient_id, provider_id,"
        " starts_at, ends_at, duration_minutes, timezone, visit_reason, status, 1"
        " FROM visits LIMIT 1"
    )
    assert await rebuild_visits(pool) == 30
    assert await view(pool) == healthy


async def test_the_swap_keeps_the_tables_indexes_and_constraints(pool: asyncpg.Pool) -> None:
    catalog = """SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'visits'
                 UNION ALL SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = 'visits'::regclass ORDER BY 1, 2"""
    before = await pool.fetch(catalog)
    await project_directly(pool, [await lifecycle(PostgresEventStore(pool), uuid.uuid4(), 0)])
    assert await rebuild_visits(pool) == 1
    assert await pool.fetch(catalog) == before
    assert not await pool.fetchval("SELECT to_regclass('visits_rebuild') IS NOT NULL")


async def test_progress_is_shown_and_the_count_returned(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = PostgresEventStore(pool)
    for i in range(12):
        await lifecycle(store, uuid.uuid4(), i)
    seen: list[tuple[int, int]] = []
    assert await rebuild_visits(pool, progress=lambda d, t: seen.append((d, t)), batch_size=5) == 12
    assert seen[-1] == (20, 20) and seen == sorted(seen)
    assert await rebuild_visits(database_url, progress=StderrProgress()) == 12
    assert capsys.readouterr().err.endswith("100% 20/20 events\n")


async def test_an_empty_store_rebuilds_an_empty_view(pool: asyncpg.Pool) -> None:
    assert await rebuild_visits(pool) == 0
    assert await view(pool) == []


async def test_only_one_rebuild_runs_at_a_time(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as other:
        await other.execute("SELECT pg_advisory_lock($1)", REBUILD_LOCK_ID)
        with pytest.raises(RebuildAlreadyRunning):
            await rebuild_visits(pool)
        await other.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_ID)
    assert await rebuild_visits(pool) == 0


async def test_a_rebuild_and_a_migration_never_run_at_once(pool: asyncpg.Pool) -> None:
    # The swap puts in place a copy of the table made at the start: a migration of
    # ``visits`` meanwhile (a column, an index) would be dropped, though recorded applied.
    async with pool.acquire() as migrating:
        await migrating.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        with pytest.raises(RebuildAlreadyRunning, match="clinic migrate is running"):
            await rebuild_visits(pool)
        await migrating.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
        # Nothing of the refused rebuild is left holding its own lock.
        assert await migrating.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_ID)
        await migrating.execute("SELECT pg_advisory_unlock($1)", REBUILD_LOCK_ID)
    held = _Held(pool, lambda query: query.startswith("ANALYZE"))
    rebuilding = asyncio.create_task(rebuild_visits(held))  # type: ignore[arg-type]
    await asyncio.wait_for(held.reached.wait(), 30)
    async with pool.acquire() as migrating:
        assert not await migrating.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID)
        held.go.set()
        assert await rebuilding == 0
        assert await migrating.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_ID)
        await migrating.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def test_a_rebuild_stalled_in_its_swap_holds_the_view_s_lock_two_seconds_at_most(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap holds ``visits`` exclusively, which stops every read of the view and the
    projector: a rebuild that stalls there (Ctrl-Z, a paused pod, a partition) is ended by
    the server, and nothing is changed."""
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    streams = [await lifecycle(store, clinic_id, i) for i in range(2)]
    await project_directly(pool, streams)
    before = await view(pool)
    async with FreezingProxy(database_url) as proxy:
        catch_up, stalled = rebuild._catch_up, asyncio.Event()

        async def stalling(conn: Any) -> int:
            if conn.is_in_transaction():  # the swap's, under the lock
                proxy.freeze()
                stalled.set()
            return await catch_up(conn)

        monkeypatch.setattr(rebuild, "_catch_up", stalling)
        rebuilding = asyncio.create_task(rebuild_visits(proxy.url))
        await asyncio.wait_for(stalled.wait(), 30)
        began = time.monotonic()
        # Waits for the lock, which the server frees.
        assert await asyncio.wait_for(view(pool), 10) == before
        assert time.monotonic() - began < 5
        proxy.thaw()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(rebuilding, 30)
    assert await view(pool) == before
    monkeypatch.undo()
    assert await rebuild_visits(pool) == 2  # the stalled one's trigger and table cleared


@contextlib.asynccontextmanager
async def writing_elsewhere(database_url: str) -> AsyncIterator[None]:
    """A long transaction that has written to ``visits`` (a batch job, say), open inside."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE visits IN ROW EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_a_rebuild_waiting_behind_a_long_transaction_lets_the_projector_write(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Its trigger's lock (taken before the snapshot) blocks writes to the view, and those
    queue behind it while it waits: it waits a second at a time, so they pass between."""
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    stream = await lifecycle(store, clinic_id, 0)  # scheduled
    await project_directly(pool, [stream])
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await store.append(stream, 1, [NewEvent(event_id=uuid.uuid4(), event=cancel, occurred_at=NOW)])
    async with writing_elsewhere(database_url):
        rebuilding = asyncio.create_task(rebuild_visits(pool))
        await eventually(lambda: lock_waited_for(pool, "visits"), within=10)
        cancelled = (await store.load(stream))[1].envelope
        began = time.monotonic()
        await asyncio.wait_for(PostgresVisits(pool).apply([cancelled], stream_sequence=2), 10)
        assert time.monotonic() - began < 5
        assert not rebuilding.done()
    assert await asyncio.wait_for(rebuilding, 60) == 1
    (row,) = await view(pool)
    assert (row["status"], row["version"]) == ("cancelled", 2)


async def test_a_rebuild_that_never_gets_the_view_s_lock_gives_up_having_changed_nothing(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    await project_directly(pool, [await lifecycle(store, clinic_id, 0)])
    before = await view(pool)
    monkeypatch.setattr(rebuild, "_LOCK_ATTEMPTS", 2)
    async with writing_elsewhere(database_url):
        with pytest.raises(TimeoutError, match="could not lock the visits table"):
            await asyncio.wait_for(rebuild_visits(pool), 30)
    assert await pool.fetchval(_TRIGGERS) == 0
    assert await pool.fetchval("SELECT to_regclass($1) IS NULL", CHANGED)
    assert await view(pool) == before
    # And nothing of it holds the rebuild's lock: the next one runs.
    assert await rebuild_visits(pool) == 1


class _Held:
    """The pool, with the ``execute`` of a statement ``holds`` picks held until ``go`` is
    set; ``reached`` is set when one is held."""

    def __init__(self, pool: asyncpg.Pool, holds: Callable[[str], bool]) -> None:
        self.pool, self.holds = pool, holds
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self.pool.acquire() as conn:
            yield _HeldConnection(conn, self)


class _HeldConnection:
    def __init__(self, conn: Any, held: _Held) -> None:
        self._conn, self._held = conn, held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def execute(self, query: str, *args: Any) -> str:
        if self._held.holds(query):
            self._held.reached.set()
            await self._held.go.wait()
        result: str = await self._conn.execute(query, *args)
        return result


async def test_a_projector_write_held_across_the_swap_keeps_the_rebuilt_row(
    pool: asyncpg.Pool,
) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    stream = await lifecycle(store, clinic_id, 0)  # scheduled, 45 minutes
    await project_directly(pool, [stream])
    # A damaged row, the kind a rebuild is for.
    await pool.execute(
        "UPDATE visits SET duration_minutes = 5, ends_at = starts_at + interval '5 minutes'"
        " WHERE appointment_id = $1",
        stream,
    )
    # The rebuild has folded its snapshot and is about to lock the live table to swap.
    swapping = _Held(pool, lambda query: query.startswith("LOCK TABLE visits"))
    rebuilding = asyncio.create_task(rebuild_visits(swapping))  # type: ignore[arg-type]
    await asyncio.wait_for(swapping.reached.wait(), 10)
    # Meanwhile the appointment is cancelled, and the projector has read the live (damaged)
    # row to fold the cancel into, its write not made yet.
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await store.append(stream, 1, [NewEvent(event_id=uuid.uuid4(), event=cancel, occurred_at=NOW)])
    cancelled = (await store.load(stream))[1].envelope
    writing = _Held(pool, lambda query: True)
    projector = PostgresVisits(writing)  # type: ignore[arg-type]
    applying = asyncio.create_task(projector.apply([cancelled], stream_sequence=2))
    await asyncio.wait_for(writing.reached.wait(), 10)
    swapping.go.set()

    async def swap_waits_or_done() -> bool:
        return rebuilding.done() or await lock_waited_for(pool, "visits")

    await eventually(swap_waits_or_done, within=30)
    writing.go.set()
    await applying
    assert await rebuilding == 1
    (row,) = await view(pool)
    assert (row["status"], row["version"]) == ("cancelled", 2)
    assert row["duration_minutes"] == 45, "the damaged row came back through the held write"


async def test_a_write_made_just_before_the_swap_is_in_the_rebuilt_view(
    pool: asyncpg.Pool,
) -> None:
    """Kills dropping the swap's own catch-up (under the lock) from ``_swap``: a write
    committed after the last unlocked pass, before the swap locks the table, is folded
    into the new table, not lost with the old one."""
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    stream = await lifecycle(store, clinic_id, 0)  # scheduled
    await project_directly(pool, [stream])
    swapping = _Held(pool, lambda query: query.startswith("LOCK TABLE visits"))
    rebuilding = asyncio.create_task(rebuild_visits(swapping))  # type: ignore[arg-type]
    await asyncio.wait_for(swapping.reached.wait(), 30)  # its passes are done
    cancel = AppointmentCancelled(clinic_id=clinic_id, cancelled_by=STAFF, cancelled_at=NOW)
    await store.append(stream, 1, [NewEvent(event_id=uuid.uuid4(), event=cancel, occurred_at=NOW)])
    cancelled = (await store.load(stream))[1].envelope
    await PostgresVisits(pool).apply([cancelled], stream_sequence=2)  # committed
    swapping.go.set()
    assert await asyncio.wait_for(rebuilding, 30) == 1
    (row,) = await view(pool)
    assert (row["status"], row["version"]) == ("cancelled", 2)


async def test_the_swap_folds_again_only_what_changed_since_the_last_pass(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills reading the notes of changed appointments without taking them (``SELECT``
    for ``DELETE ... RETURNING`` in ``_catch_up``): the view stays right, but the swap,
    which holds every read of the view, would fold again all that changed since the start
    instead of what changed since the last pass."""
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    await project_directly(pool, [await lifecycle(store, clinic_id, i) for i in range(2)])
    passes: list[tuple[bool, int]] = []
    catch_up = rebuild._catch_up

    async def counted(conn: Any) -> int:
        folded = await catch_up(conn)
        passes.append((conn.is_in_transaction(), folded))
        return folded

    monkeypatch.setattr(rebuild, "_catch_up", counted)
    built = _Held(pool, lambda query: query.startswith("ANALYZE"))
    rebuilding = asyncio.create_task(rebuild_visits(built))  # type: ignore[arg-type]
    await asyncio.wait_for(built.reached.wait(), 30)  # its snapshot folded, no pass yet
    await project_directly(pool, [await lifecycle(store, clinic_id, i) for i in range(2, 5)])
    built.go.set()
    assert await asyncio.wait_for(rebuilding, 30) == 5
    assert passes == [(False, 3), (True, 0)]  # one pass without the lock, none left for it


_TRIGGERS = (
    "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'visits'::regclass AND NOT tgisinternal"
)


async def test_a_rebuild_that_stops_midway_leaves_the_live_table_as_it_was(
    pool: asyncpg.Pool,
) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    streams = [await lifecycle(store, clinic_id, i) for i in range(3)]
    await project_directly(pool, streams)
    before = await view(pool)

    def interrupted(done: int, total: int) -> None:
        raise RuntimeError("stopped while it folds")

    with pytest.raises(RuntimeError, match="stopped while it folds"):
        await rebuild_visits(pool, progress=interrupted, batch_size=1)
    assert await pool.fetchval(_TRIGGERS) == 0  # the projector writes as before
    assert await pool.fetchval("SELECT to_regclass($1) IS NULL", CHANGED)
    assert await view(pool) == before


async def test_a_rebuild_removes_what_a_crashed_one_left_on_the_live_table(
    pool: asyncpg.Pool,
) -> None:
    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    streams = [await lifecycle(store, clinic_id, i) for i in range(2)]
    async with pool.acquire() as conn:
        await _watch(conn)  # and then the process was killed
    await project_directly(pool, streams)
    noted = await pool.fetch(f"SELECT appointment_id FROM {CHANGED}")  # each write noted once
    assert sorted(r["appointment_id"] for r in noted) == sorted(streams)
    assert await rebuild_visits(pool) == 2
    assert await pool.fetchval(_TRIGGERS) == 0
    assert await pool.fetchval("SELECT to_regclass($1) IS NULL", CHANGED)


@contextlib.asynccontextmanager
async def scratch_role(pool: asyncpg.Pool, prefix: str) -> AsyncIterator[str]:
    """A new role's name (roles are the server's, not the database's: a unique one),
    dropped after with what it owns in this database handed back and its grants gone."""
    role = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await pool.execute(f"CREATE ROLE {role}")
    try:
        yield role
    finally:
        await pool.execute(f"REASSIGN OWNED BY {role} TO current_user")
        await pool.execute(f"DROP OWNED BY {role}")
        await pool.execute(f"DROP ROLE {role}")


async def test_roles_granted_the_view_keep_their_access_after_a_rebuild(
    pool: asyncpg.Pool,
) -> None:
    async with scratch_role(pool, "clinic_reader") as reader:
        await pool.execute(f"GRANT SELECT, UPDATE ON visits TO {reader}")
        await project_directly(pool, [await lifecycle(PostgresEventStore(pool), uuid.uuid4(), 0)])
        assert await rebuild_visits(pool) == 1
        granted = await pool.fetch(
            "SELECT privilege_type FROM information_schema.role_table_grants"
            " WHERE table_name = 'visits' AND grantee = $1 ORDER BY 1",
            reader,
        )
        assert [g["privilege_type"] for g in granted] == ["SELECT", "UPDATE"]


async def test_a_rebuild_on_a_service_pool_that_never_gets_the_lock_leaves_no_advisory_lock(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's pools skip asyncpg's reset query (no pg_advisory_unlock_all on
    release): a rebuild whose clean-up cannot lock ``visits`` (a report began reading it
    during the build) must still unlock its session's advisory locks, or the pooled
    connection holds them for good: every later rebuild "already running", every
    clinic migrate waiting forever."""

    async def keep_session(_conn: asyncpg.Connection) -> None:
        pass

    store, clinic_id = PostgresEventStore(pool), uuid.uuid4()
    await project_directly(pool, [await lifecycle(store, clinic_id, 0)])
    monkeypatch.setattr(rebuild, "_LOCK_ATTEMPTS", 2)
    monkeypatch.setattr(rebuild, "_CLEAN_UP_ATTEMPTS", 1)
    report = await asyncpg.connect(database_url)
    reading = report.transaction()
    build = rebuild._build

    async def build_then_a_report_starts(*args: Any) -> None:
        await build(*args)
        await reading.start()
        await report.fetch("SELECT * FROM visits")  # a long report, open past the rebuild

    monkeypatch.setattr(rebuild, "_build", build_then_a_report_starts)
    service_pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, reset=keep_session
    )
    try:
        with pytest.raises(TimeoutError, match="could not lock the visits table"):
            await asyncio.wait_for(rebuild_visits(service_pool), 30)
        await report.close()  # the report ends
        held = await pool.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert held == 0, f"{held} advisory locks left on the pooled connection"
    finally:
        await service_pool.close()


async def test_the_rebuilt_view_keeps_the_owner_of_the_live_one(pool: asyncpg.Pool) -> None:
    """Kills skipping ``ALTER TABLE ... OWNER TO`` in ``_copy_privileges``: a rebuild run as
    another role (a superuser, an operator's) leaves ``visits`` owned by the role that
    owned it (the service's, which migrates it), not by whoever ran the rebuild."""
    async with scratch_role(pool, "clinic_owner") as owner:
        await pool.execute(f"ALTER TABLE visits OWNER TO {owner}")
        await project_directly(pool, [await lifecycle(PostgresEventStore(pool), uuid.uuid4(), 0)])
        assert await rebuild_visits(pool) == 1
        assert (
            await pool.fetchval(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'visits'::regclass"
            )
            == owner
        )
