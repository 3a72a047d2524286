"""Group commit of appends against real PostgreSQL: batches, their conflicts and failures.

Concurrent ``append`` calls started together (``asyncio.gather``) queue before the store's
sender runs, so they go as one batch statement; :class:`Recording` passes the store's
statements through to the pool and notes how many appends each carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.service_layer.ports import (
    AppendResult,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    NewEvent,
    StatementGaveUp,
    StoredAnswer,
    StreamVersionConflict,
)
from services.errors import SlotTaken, Unavailable

CLINIC = uuid.uuid4()
STAFF = Actor(id=uuid.uuid4(), role="staff")
SOON = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)


class Recording:
    """The pool, passed through; notes the appends each append statement carried, and
    holds statements while ``hold`` is set and not yet released."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.sent: list[int] = []
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.hold: asyncio.Event | None = None

    async def _note(self, query: str, appends: int) -> None:
        if "INSERT INTO events" in query:
            self.sent.append(appends)
            self.started.put_nowait(appends)
            if self.hold is not None:
                await self.hold.wait()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        await self._note(query, len(set(args[1])) if "unnest" in query else 0)
        return await self.pool.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        await self._note(query, 1)
        return await self.pool.fetchrow(query, *args)


def recording_store(pool: asyncpg.Pool, in_flight: int = 1) -> tuple[PostgresEventStore, Recording]:
    recording = Recording(pool)
    store = PostgresEventStore(recording, in_flight=in_flight)  # type: ignore[arg-type]
    return store, recording


def booking(provider: uuid.UUID | None = None, minutes_later: int = 0) -> list[NewEvent]:
    event = AppointmentScheduled(
        clinic_id=CLINIC,
        patient_id=uuid.uuid4(),
        provider_id=provider or uuid.uuid4(),
        starts_at=SOON + timedelta(minutes=minutes_later),
        duration_minutes=30,
        timezone="UTC",
        scheduled_by=STAFF,
    )
    return [NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))]


def cancellation() -> list[NewEvent]:
    event = AppointmentCancelled(
        clinic_id=CLINIC, cancelled_by=STAFF, cancelled_at=datetime.now(UTC)
    )
    return [NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))]


def answer_under(principal: uuid.UUID, key: str) -> IdempotencyRecord:
    answer = StoredAnswer(fingerprint="f", status=201, body=b"{}", consistency_token="t")
    return IdempotencyRecord(principal_id=principal, key=key, answer=answer)


async def hold_a_booking(
    conn: asyncpg.Connection, provider: uuid.UUID
) -> asyncpg.transaction.Transaction:
    """An uncommitted booking of ``provider`` at ``SOON`` on ``conn``: appends booking that
    slot wait on its lock until the transaction returned ends."""
    held = conn.transaction()
    await held.start()
    await conn.execute(
        """INSERT INTO provider_bookings (appointment_id, clinic_id, provider_id, during)
           VALUES ($1, $2, $3, tstzrange($4::timestamptz, $4 + interval '30 minutes'))""",
        uuid.uuid4(),
        CLINIC,
        provider,
        SOON,
    )
    return held


@contextlib.asynccontextmanager
async def a_held_slot(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, uuid.UUID]]:
    """A pool whose statements wait 200 ms at most for a lock, and a provider whose slot at
    ``SOON`` another session holds (:func:`hold_a_booking`) until the block ends."""
    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=2, server_settings={"lock_timeout": "200ms"}
    )
    blocker = await asyncpg.connect(database_url)
    try:
        provider = uuid.uuid4()
        held = await hold_a_booking(blocker, provider)
        try:
            yield pool, provider
        finally:
            await held.rollback()
    finally:
        await blocker.close()
        await pool.close()


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    """(events, outbox rows, bookings, stored answers)."""
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM outbox),
                  (SELECT count(*) FROM provider_bookings),
                  (SELECT count(*) FROM idempotency_keys)"""
    )
    assert row is not None
    return row[0], row[1], row[2], row[3]


async def test_concurrent_appends_of_many_streams_commit_with_their_own_answers(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool, in_flight=2)
    streams = [uuid.uuid4() for _ in range(300)]
    first = await asyncio.gather(*(store.append(s, 0, booking()) for s in streams))
    # Then half of them cancelled while as many new ones are booked.
    new_streams = [uuid.uuid4() for _ in range(150)]
    second = await asyncio.gather(
        *(store.append(s, 1, cancellation()) for s in streams[:150]),
        *(store.append(s, 0, booking()) for s in new_streams),
    )

    assert max(recording.sent) > 1  # batches were sent
    assert sum(recording.sent) == 600  # and nothing twice
    results = dict(zip(streams + streams[:150] + new_streams, first + second, strict=False))
    assert [r.stream_version for r in first] == [1] * 300
    assert [r.stream_version for r in second] == [2] * 150 + [1] * 150
    for stream, result in [*zip(streams[:150], second[:150], strict=True), *results.items()]:
        recorded = await store.load(stream)
        assert recorded[-1].envelope.global_position == result.global_position
        assert recorded[-1].envelope.stream_version == result.stream_version
    positions = [r.global_position for r in first + second]
    assert len(set(positions)) == 600
    assert await pool.fetch("SELECT global_position FROM outbox ORDER BY 1") == await pool.fetch(
        "SELECT global_position FROM events ORDER BY 1"
    )
    assert await counts(pool) == (600, 600, 300, 0)  # cancels freed their bookings


async def test_a_batch_takes_global_positions_in_arrival_order(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    results = await asyncio.gather(*(store.append(uuid.uuid4(), 0, booking()) for _ in range(50)))
    assert recording.sent == [50]
    positions = [r.global_position for r in results]
    assert positions == sorted(positions) and len(set(positions)) == 50


async def test_concurrent_appends_to_one_stream_at_one_version_have_one_winner(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool, in_flight=2)
    stream = uuid.uuid4()
    results = await asyncio.gather(
        *(store.append(stream, 0, booking()) for _ in range(10)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, AppendResult)]
    assert len(winners) == 1 and winners[0].stream_version == 1
    assert all(isinstance(r, StreamVersionConflict) for r in results if r not in winners)
    assert recording.sent == [1] * 10  # never two appends of one stream in a batch
    assert await counts(pool) == (1, 1, 1, 0)


async def test_overlapping_slots_in_one_batch_have_one_winner(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    provider = uuid.uuid4()
    innocent = store.append(uuid.uuid4(), 0, booking())
    rivals = [store.append(uuid.uuid4(), 0, booking(provider, i)) for i in range(8)]
    results = await asyncio.gather(innocent, *rivals, return_exceptions=True)

    assert recording.sent == [9] + [1] * 9  # refused as a whole, then decided one by one
    assert isinstance(results[0], AppendResult) and isinstance(results[1], AppendResult)
    assert all(isinstance(r, SlotTaken) for r in results[2:])
    assert await counts(pool) == (2, 2, 2, 0)  # nothing of the losers half-written


async def test_one_idempotency_key_in_one_batch_has_one_winner(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    principal = uuid.uuid4()
    results = await asyncio.gather(
        *(
            store.append(uuid.uuid4(), 0, booking(), answer_under(principal, "k1"))
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    assert recording.sent == [5] + [1] * 5
    assert isinstance(results[0], AppendResult)
    assert all(isinstance(r, IdempotencyKeyTaken) for r in results[1:])
    assert await counts(pool) == (1, 1, 1, 1)
    stored = await store.find_answer(principal, "k1")
    assert stored is not None and stored.status == 201


async def test_a_refused_batch_still_commits_its_innocent_appends(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    taken = uuid.uuid4()
    await store.append(taken, 0, booking())
    bad_key = answer_under(uuid.uuid4(), "nul \x00 in a key")  # PostgreSQL refuses the text
    streams = [uuid.uuid4() for _ in range(4)]
    results = await asyncio.gather(
        store.append(streams[0], 0, booking()),
        store.append(taken, 0, booking()),  # stale
        store.append(streams[1], 0, booking()),
        store.append(streams[2], 0, booking(), bad_key),
        store.append(streams[3], 0, booking()),
        return_exceptions=True,
    )
    assert recording.sent == [1, 5] + [1] * 5
    assert isinstance(results[1], StreamVersionConflict)
    assert isinstance(results[3], asyncpg.PostgresError)
    innocents = [results[0], results[2], results[4]]
    for stream, result in zip([streams[0], streams[1], streams[3]], innocents, strict=True):
        assert isinstance(result, AppendResult) and result.stream_version == 1
        [recorded] = await store.load(stream)
        assert recorded.envelope.global_position == result.global_position
    assert await store.load(streams[2]) == []
    assert await counts(pool) == (4, 4, 4, 0)


async def test_a_cancelled_caller_leaves_its_batch_alone(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    recording.hold = asyncio.Event()
    streams = [uuid.uuid4() for _ in range(4)]
    callers = [asyncio.create_task(store.append(s, 0, booking())) for s in streams[:3]]
    assert await recording.started.get() == 3  # the batch is in flight (held)
    callers[1].cancel()
    queued = asyncio.create_task(store.append(streams[3], 0, booking()))
    await asyncio.sleep(0.01)
    queued.cancel()  # gives up before its batch is sent
    recording.hold.set()

    done = await asyncio.gather(*callers, queued, return_exceptions=True)
    assert isinstance(done[0], AppendResult) and isinstance(done[2], AppendResult)
    assert isinstance(done[1], asyncio.CancelledError)
    assert isinstance(done[3], asyncio.CancelledError)
    # The cancelled caller's append went with its batch; the queued one was never sent.
    assert [len(await store.load(s)) for s in streams] == [1, 1, 1, 0]
    later = await store.append(uuid.uuid4(), 0, booking())  # the store goes on
    assert later.stream_version == 1
    assert recording.sent == [3, 1]


async def test_a_batch_on_a_closed_pool_answers_unavailable_to_every_caller(
    database_url: str,
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    store = PostgresEventStore(pool)
    await pool.close()
    results = await asyncio.gather(
        *(store.append(uuid.uuid4(), 0, booking()) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results), results


async def test_a_terminated_backend_fails_its_whole_batch_as_unavailable(
    pool: asyncpg.Pool, database_url: str
) -> None:
    store = PostgresEventStore(pool)
    provider = uuid.uuid4()
    blocker = await asyncpg.connect(database_url)
    try:
        held = await hold_a_booking(blocker, provider)  # the batch waits on it, in flight
        appends = asyncio.gather(
            store.append(uuid.uuid4(), 0, booking()),
            store.append(uuid.uuid4(), 0, booking(provider)),
            store.append(uuid.uuid4(), 0, booking()),
            return_exceptions=True,
        )
        for _ in range(500):
            waiting = await blocker.fetch(
                """SELECT pid FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'"""
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert len(waiting) == 1
        await blocker.execute("SELECT pg_terminate_backend($1)", waiting[0]["pid"])
        results = await appends
        await held.rollback()
    finally:
        await blocker.close()
    assert all(isinstance(r, Unavailable) for r in results), results
    assert await counts(pool) == (0, 0, 0, 0)


async def test_each_append_of_a_batch_keeps_its_own_trace_context(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)

    async def traced(stream: uuid.UUID, trace_id: int) -> AppendResult:
        span = NonRecordingSpan(SpanContext(trace_id, 0x1234, is_remote=True))
        with trace.use_span(span):  # the command's span, in the caller's task
            return await store.append(stream, 0, booking())

    streams = [uuid.uuid4() for _ in range(20)]
    await asyncio.gather(*(traced(s, i + 1) for i, s in enumerate(streams)))
    assert recording.sent == [20]
    rows = await pool.fetch("SELECT stream_id, traceparent FROM events")
    stored = {row["stream_id"]: row["traceparent"] for row in rows}
    assert [stored[s] for s in streams] == [f"00-{i + 1:032x}-{0x1234:016x}-00" for i in range(20)]


async def test_a_batch_refused_for_one_append_sends_only_that_one_alone(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool)
    stale, provider = uuid.uuid4(), uuid.uuid4()
    await store.append(stale, 0, booking())
    await store.append(uuid.uuid4(), 0, booking(provider))  # its slot, taken
    for offender, name in [
        (store.append(stale, 0, booking()), "stale version"),  # a retried booking, say
        (store.append(uuid.uuid4(), 0, booking(provider)), "slot taken"),
    ]:
        recording.sent.clear()
        innocents = [store.append(uuid.uuid4(), 0, booking()) for _ in range(10)]
        results = await asyncio.gather(
            *innocents[:5], offender, *innocents[5:], return_exceptions=True
        )
        # The batch, the other ten together again, the append it names alone.
        assert recording.sent == [11, 10, 1], (name, recording.sent)
        assert isinstance(results[5], (StreamVersionConflict, SlotTaken)), (name, results[5])
        assert all(isinstance(r, AppendResult) for r in results[:5] + results[6:]), name
    assert await counts(pool) == (22, 22, 22, 0)


async def test_the_rest_of_a_refused_batch_refused_again_is_sent_one_by_one(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool)
    taken = uuid.uuid4()
    await store.append(uuid.uuid4(), 0, booking(taken))
    principal = uuid.uuid4()
    await store.append(uuid.uuid4(), 0, booking(), answer_under(principal, "used"))
    recording.sent.clear()
    results = await asyncio.gather(
        store.append(uuid.uuid4(), 0, booking()),
        store.append(uuid.uuid4(), 0, booking(taken)),
        store.append(uuid.uuid4(), 0, booking()),
        store.append(uuid.uuid4(), 0, booking(), answer_under(principal, "used")),
        store.append(uuid.uuid4(), 0, booking()),
        return_exceptions=True,
    )
    # The rest of what PostgreSQL names first, refused again, one by one (many bad appends,
    # as in retries after an outage: cheapest so); then the one it named.
    assert recording.sent == [5, 4, 1, 1, 1, 1, 1], recording.sent
    assert isinstance(results[1], SlotTaken) and isinstance(results[3], IdempotencyKeyTaken)
    assert all(isinstance(results[i], AppendResult) for i in (0, 2, 4))


async def test_a_read_only_database_fails_a_batch_as_unavailable_without_sending_each(
    database_url: str,
) -> None:
    # As after a failover, the old primary still taking connections: a refusal that passes.
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=2,
        server_settings={"default_transaction_read_only": "on"},
    )
    try:
        store, recording = recording_store(pool)
        results = await asyncio.gather(
            *(store.append(uuid.uuid4(), 0, booking()) for _ in range(6)),
            return_exceptions=True,
        )
        assert all(isinstance(r, Unavailable) for r in results), results
        assert recording.sent == [6]  # not sent again one by one
        with pytest.raises(Unavailable):
            await store.append(uuid.uuid4(), 0, booking())
        with pytest.raises(Unavailable):
            await store.save_answer(answer_under(uuid.uuid4(), "k"))
    finally:
        await pool.close()


async def test_a_cancel_batched_with_a_booking_of_its_slot_comes_first_in_the_log(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool)
    provider, cancelled = uuid.uuid4(), uuid.uuid4()
    await store.append(cancelled, 0, booking(provider))
    recording.sent.clear()
    booked, freed = await asyncio.gather(
        store.append(uuid.uuid4(), 0, booking(provider)),  # arrives first
        store.append(cancelled, 1, cancellation()),
    )
    assert recording.sent == [2]
    # The log never shows two bookings of one slot at once.
    assert freed.global_position < booked.global_position


async def test_a_booking_of_a_slot_its_batch_freed_gets_it_though_the_batch_was_refused(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool)
    provider, freed_by_cancel = uuid.uuid4(), uuid.uuid4()
    await store.append(freed_by_cancel, 0, booking(provider))
    await store.append(uuid.uuid4(), 0, booking(provider, 120))  # a slot that stays taken
    recording.sent.clear()
    results = await asyncio.gather(
        store.append(freed_by_cancel, 1, cancellation()),
        store.append(uuid.uuid4(), 0, booking(provider)),  # the slot the cancel frees
        store.append(uuid.uuid4(), 0, booking(provider, 120)),
        store.append(uuid.uuid4(), 0, booking()),
        return_exceptions=True,
    )
    # The refusal names the provider: its two bookings go alone after the rest (the
    # cancel among them), so the booking of the freed slot gets it.
    assert isinstance(results[0], AppendResult) and isinstance(results[1], AppendResult)
    assert isinstance(results[2], SlotTaken) and isinstance(results[3], AppendResult)
    assert recording.sent == [4, 2, 1, 1]


async def test_a_statement_given_up_on_fails_only_its_own_append(database_url: str) -> None:
    async with a_held_slot(database_url) as (pool, provider):
        store, recording = recording_store(pool)
        results = await asyncio.gather(
            store.append(uuid.uuid4(), 0, booking()),
            store.append(uuid.uuid4(), 0, booking(provider)),  # waits on the lock
            store.append(uuid.uuid4(), 0, booking()),
            return_exceptions=True,
        )
    assert isinstance(results[1], Unavailable), results  # a 503 for the one that waited
    assert isinstance(results[0], AppendResult) and isinstance(results[2], AppendResult)
    assert recording.sent == [3, 1, 1, 1]


async def test_two_appends_waiting_on_one_held_slot_fail_only_themselves(
    database_url: str,
) -> None:
    # Two timeouts in a row used to read as a stall: every later append of the batch was
    # turned away unsent, though it waited on nothing.
    async with a_held_slot(database_url) as (pool, provider):
        store, recording = recording_store(pool)
        first = asyncio.ensure_future(store.append(uuid.uuid4(), 0, booking()))  # alone
        await asyncio.sleep(0)
        items = [booking(provider), booking(provider), *(booking() for _ in range(5))]
        results = await asyncio.gather(
            *(store.append(uuid.uuid4(), 0, events) for events in items), return_exceptions=True
        )
        await first
        stored = await counts(pool)
    assert isinstance(results[0], StatementGaveUp) and isinstance(results[1], StatementGaveUp)
    assert all(isinstance(r, AppendResult) for r in results[2:]), results
    assert recording.sent == [1, 7, 1, 1, 5]
    assert stored[0] == 6


async def test_an_append_past_the_stored_version_is_a_conflict_not_a_gap(
    pool: asyncpg.Pool,
) -> None:
    # A state ahead of the store (cached before a failover that lost its commit): the
    # append must not leave a stream that starts at version 2.
    store, _ = recording_store(pool)
    lost, kept = uuid.uuid4(), uuid.uuid4()
    await store.append(kept, 0, booking())
    with pytest.raises(StreamVersionConflict):
        await store.append(lost, 1, cancellation())
    results = await asyncio.gather(
        store.append(lost, 1, cancellation()),
        store.append(kept, 1, cancellation()),
        store.append(uuid.uuid4(), 0, booking()),
        return_exceptions=True,
    )
    assert isinstance(results[0], StreamVersionConflict), results
    assert isinstance(results[1], AppendResult) and results[1].stream_version == 2
    assert isinstance(results[2], AppendResult)
    assert await store.load(lost) == []
    assert [r.envelope.stream_version for r in await store.load(kept)] == [1, 2]


async def test_an_append_of_several_events_follows_its_own_first_event(
    pool: asyncpg.Pool,
) -> None:
    store, recording = recording_store(pool)
    alone, batched = uuid.uuid4(), uuid.uuid4()
    await store.append(alone, 0, booking() + cancellation())
    results = await asyncio.gather(
        store.append(batched, 0, booking() + cancellation()),
        store.append(uuid.uuid4(), 0, booking()),
    )
    assert recording.sent == [1, 2]
    assert results[0].stream_version == 2
    for stream in (alone, batched):
        assert [r.envelope.stream_version for r in await store.load(stream)] == [1, 2]


async def test_the_append_statements_keep_their_generic_plans(database_url: str) -> None:
    # A statement PostgreSQL plans anew at every execution (its generic plan costed above
    # the custom ones) cost ~0.2 ms of server CPU per append: the commands' rate halved.
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        store = PostgresEventStore(pool, in_flight=1)
        for _ in range(12):
            streams = [uuid.uuid4() for _ in range(4)]
            await store.append(streams[0], 0, booking())  # alone: the single statement
            await store.append(streams[0], 1, cancellation())
            await asyncio.gather(*(store.append(s, 0, booking()) for s in streams[1:]))
            await asyncio.gather(*(store.append(s, 1, cancellation()) for s in streams[1:]))
        plans = await pool.fetch(
            """SELECT generic_plans, custom_plans FROM pg_prepared_statements
               WHERE statement LIKE '%INSERT INTO events%'
                 AND statement NOT LIKE '%pg_prepared_statements%'"""
        )
    finally:
        await pool.close()
    assert len(plans) == 2, plans  # the single and the batch statement
    for plan in plans:
        assert plan["generic_plans"] > plan["custom_plans"], plans


async def test_a_gap_in_a_batch_is_charged_to_its_own_append(pool: asyncpg.Pool) -> None:
    store, recording = recording_store(pool)
    provider, cancelled, lost = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await store.append(cancelled, 0, booking(provider))
    recording.sent.clear()
    results = await asyncio.gather(
        store.append(cancelled, 1, cancellation()),
        store.append(uuid.uuid4(), 0, booking(provider)),  # the slot the cancel frees
        store.append(lost, 1, cancellation()),  # decided on a state the store lost
        return_exceptions=True,
    )
    # The refusal names the gapped stream only: the other two go together, then it alone.
    assert recording.sent == [3, 2, 1], recording.sent
    assert isinstance(results[0], AppendResult) and isinstance(results[1], AppendResult)
    assert isinstance(results[2], StreamVersionConflict)
