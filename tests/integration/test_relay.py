"""The outbox relay against real PostgreSQL and NATS: every committed event reaches the
``APPOINTMENTS`` stream exactly once, in order per appointment, whatever the commit order
and however many relays run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from nats.js.api import AckPolicy, ConsumerConfig, StorageType
from prometheus_client import REGISTRY

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled, EventEnvelope
from contracts.subjects import EVENTS_STREAM, EVENTS_SUBJECTS, event_subject
from services.appointments.adapters.nats.streams import (
    DUPLICATE_WINDOW_SECONDS,
    StreamConfigConflict,
    ensure_events_stream,
    events_stream_config,
)
from services.appointments.adapters.postgres import outbox
from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.outbox import CHANNEL
from services.appointments.bootstrap import SESSION_KEEPALIVES, create_session_pool
from services.appointments.projector import VisitsProjector
from services.appointments.relay import OutboxDoorbell, OutboxRelay, RingingEventStore
from services.appointments.service_layer.ports import NewEvent
from services.embedded import EmbeddedNats
from services.metrics import RELAY_BACKLOG, RELAY_LAG_SECONDS


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def lag_reported(at_least: float) -> bool:
    lag = REGISTRY.get_sample_value("clinic_relay_lag_seconds")
    return lag is not None and lag >= at_least


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def booking(clinic_id: uuid.UUID) -> AppointmentScheduled:
    return AppointmentScheduled(
        clinic_id=clinic_id,
        patient_id=uuid.uuid4(),
        provider_id=uuid.uuid4(),
        starts_at=datetime.now(UTC) + timedelta(days=1),
        duration_minutes=30,
        timezone="Europe/Berlin",
        scheduled_by=Actor(id=uuid.uuid4(), role="staff"),
    )


def recorded(event: AppointmentScheduled | AppointmentCancelled) -> NewEvent:
    return NewEvent(event_id=uuid.uuid4(), event=event, occurred_at=datetime.now(UTC))


def cancellation(clinic_id: uuid.UUID) -> AppointmentCancelled:
    return AppointmentCancelled(
        clinic_id=clinic_id,
        cancelled_by=Actor(id=uuid.uuid4(), role="patient"),
        cancelled_at=datetime.now(UTC),
    )


async def append_lifecycle(store: PostgresEventStore, clinic_id: uuid.UUID) -> list[uuid.UUID]:
    """Schedule then cancel one appointment; the two event ids."""
    stream = uuid.uuid4()
    scheduled = recorded(booking(clinic_id))
    cancelled = recorded(cancellation(clinic_id))
    await store.append(stream, 0, [scheduled])
    await store.append(stream, 1, [cancelled])
    return [scheduled.event_id, cancelled.event_id]


async def append_many(
    store: PostgresEventStore, appointments: int, writers: int = 16
) -> list[uuid.UUID]:
    clinic_id = uuid.uuid4()
    ids: list[uuid.UUID] = []

    async def writer(count: int) -> None:
        for _ in range(count):
            ids.extend(await append_lifecycle(store, clinic_id))

    share, extra = divmod(appointments, writers)
    await asyncio.gather(*(writer(share + (i < extra)) for i in range(writers)))
    return ids


async def stream_messages(nc: NATS) -> list[nats.aio.msg.Msg]:
    """Every message of the stream, in stream order, read back with a throwaway consumer."""
    js = nc.jetstream()
    total = (await js.stream_info(EVENTS_STREAM)).state.messages
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, filter_subject=EVENTS_SUBJECTS)
    sub = await js.pull_subscribe(EVENTS_SUBJECTS, stream=EVENTS_STREAM, config=config)
    messages: list[nats.aio.msg.Msg] = []
    try:
        while len(messages) < total:
            messages.extend(await sub.fetch(min(500, total - len(messages)), timeout=5))
    finally:
        await sub.unsubscribe()
    return messages


async def outbox_empty(pool: asyncpg.Pool) -> bool:
    return not await pool.fetchval("SELECT EXISTS (SELECT FROM outbox)")


async def published(relay: OutboxRelay, count: int) -> bool:
    return relay.published >= count


def event_ids(messages: list[nats.aio.msg.Msg]) -> list[str]:
    return [msg.headers["Nats-Msg-Id"] for msg in messages if msg.headers]


async def test_every_committed_event_arrives_once_with_its_envelope_and_subject(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    store = PostgresEventStore(pool)
    relay = OutboxRelay(pool, nc)
    async with running(relay):
        appended = await append_many(store, 1500)
        await eventually(lambda: outbox_empty(pool))
    messages = await stream_messages(nc)
    assert len(messages) == len(appended) == 3000
    assert sorted(event_ids(messages)) == sorted(str(i) for i in appended)
    assert relay.published == 3000
    stored = {
        row["event_id"]: row
        for row in await pool.fetch(
            "SELECT event_id, stream_id, stream_version, clinic_id, type FROM events"
        )
    }
    last_version: dict[uuid.UUID, int] = {}
    for msg in messages:
        envelope = msgspec.json.decode(msg.data, type=EventEnvelope)
        row = stored[envelope.event_id]
        kind = "scheduled" if envelope.type == "AppointmentScheduled" else "cancelled"
        assert msg.subject == event_subject(row["clinic_id"], envelope.stream_id, kind)
        assert envelope.stream_version == row["stream_version"]
        assert envelope.data["clinic_id"] == str(row["clinic_id"])
        # Within one appointment, the stream holds its events in version order.
        assert envelope.stream_version == last_version.get(envelope.stream_id, 0) + 1
        last_version[envelope.stream_id] = envelope.stream_version


async def test_every_batch_carries_the_stored_trace_context(pool: asyncpg.Pool, nc: NATS) -> None:
    store = PostgresEventStore(pool)
    await append_many(store, 60)  # 120 events
    context = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await pool.execute("UPDATE events SET traceparent = $1, correlation_id = NULL", context)
    async with running(OutboxRelay(pool, nc, batch_size=10)):  # the look-ahead path too
        await eventually(lambda: outbox_empty(pool))
    messages = await stream_messages(nc)
    assert len(messages) == 120
    assert all(msg.headers and msg.headers.get("traceparent") == context for msg in messages)


async def test_a_transaction_committing_late_is_published_after_it_commits(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    store = PostgresEventStore(pool)
    async with pool.acquire() as conn, running(OutboxRelay(pool, nc, poll_interval=0.01)):
        held = conn.transaction()
        await held.start()
        # Takes its global position now, before every event appended below.
        late_ids = await append_lifecycle(PostgresEventStore(conn), uuid.uuid4())
        late_positions = await conn.fetch("SELECT global_position FROM events")
        early_ids = await append_many(store, 100, writers=4)
        early_positions = await pool.fetch("SELECT global_position FROM events")
        assert max(late_positions) < min(early_positions)

        async def early_published() -> bool:
            return len(await stream_messages(nc)) == len(early_ids)

        await eventually(early_published)
        assert not set(map(str, late_ids)) & set(event_ids(await stream_messages(nc)))
        await held.commit()
        await eventually(lambda: outbox_empty(pool))
    published = event_ids(await stream_messages(nc))
    assert sorted(published) == sorted(str(i) for i in early_ids + late_ids)
    assert published[-2:] == [str(i) for i in late_ids]


async def test_two_relays_at_once_publish_each_event_once_and_the_standby_takes_over(
    pool: asyncpg.Pool, database_url: str, nats_url: str, nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.appointments.relay")
    store = PostgresEventStore(pool)
    other_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    other_nc = await nats.connect(nats_url)
    first = OutboxRelay(pool, nc, batch_size=50)
    second = OutboxRelay(other_pool, other_nc, batch_size=50, standby_interval=0.05)
    stop_first = asyncio.Event()
    first_task = asyncio.create_task(first.run(stop_first))
    try:
        appended = await append_many(store, 10)
        await eventually(lambda: published(first, 20))  # the first one is active
        async with running(second):
            appended += await append_many(store, 500)
            await eventually(lambda: outbox_empty(pool))
            assert second.published == 0  # a standby publishes nothing
            stop_first.set()
            await first_task
            appended += await append_many(store, 500)
            await eventually(lambda: outbox_empty(pool))
    finally:
        stop_first.set()
        await first_task
        await other_nc.close()
        await other_pool.close()
    messages = await stream_messages(nc)
    assert len(messages) == len(appended) == 2020
    assert sorted(event_ids(messages)) == sorted(str(i) for i in appended)
    # Each outbox row was published (and deleted) by exactly one relay.
    assert first.published + second.published == 2020
    assert second.published == 1000
    said = [r.getMessage() for r in caplog.records if r.name == "services.appointments.relay"]
    assert said.count("relay standing by: another relay holds the lead") == 1  # once, not per poll


async def test_the_doorbell_wakes_the_relay_before_its_poll(pool: asyncpg.Pool, nc: NATS) -> None:
    store = RingingEventStore(PostgresEventStore(pool), OutboxDoorbell(pool))
    async with running(OutboxRelay(pool, nc, poll_interval=30.0)):

        async def waiting_out_its_poll() -> bool:
            # The leading relay's session is idle after reading the (empty) outbox.
            waiting: bool = await pool.fetchval(
                """SELECT EXISTS (
                       SELECT FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                       WHERE l.locktype = 'advisory' AND l.granted AND a.state = 'idle'
                         AND a.datname = current_database()
                         AND a.query LIKE '%FROM outbox%')"""
            )
            return waiting

        await eventually(waiting_out_its_poll)
        started = time.monotonic()
        ids = await append_lifecycle(store, uuid.uuid4())  # type: ignore[arg-type]
        await eventually(lambda: outbox_empty(pool), within=10)
        assert time.monotonic() - started < 5
    assert event_ids(await stream_messages(nc)) == [str(i) for i in ids]


async def test_a_ring_commits_without_waiting_for_the_wal_flush(pool: asyncpg.Pool) -> None:
    """The ring relaxes ``synchronous_commit`` for its own transaction only: the service's
    pool keeps session state between uses, so a leaked setting would make every later
    append on that connection non-durable."""
    rung = asyncio.Event()

    def on_ring(*_: object) -> None:
        rung.set()

    async with pool.acquire() as listener, pool.acquire() as conn:
        await listener.add_listener(CHANNEL, on_ring)
        await conn.execute("SET synchronous_commit = on")  # the test server's is off
        async with conn.transaction():
            # Inside a transaction the statement's setting outlives it: it did take effect.
            await outbox.ring(conn)
            assert await conn.fetchval("SHOW synchronous_commit") == "off"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"  # for that one only
        await conn.execute("RESET synchronous_commit")
        await asyncio.wait_for(rung.wait(), 5)  # delivered at the commit
        await listener.remove_listener(CHANNEL, on_ring)


@pytest.mark.fault
async def test_a_relay_whose_acks_stall_hands_the_outbox_to_a_standby(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    class Counted(OutboxRelay):
        leads = 0

        async def _lead(self, conn: Any, stop: asyncio.Event) -> None:
            self.leads += 1
            await super()._lead(conn, stop)

    store = PostgresEventStore(pool)
    appended = await append_many(store, 50)
    # The leader reaches NATS but never sees an ack in time; the standby does.
    stalled = Counted(pool, nc, ack_timeout=0.000_001, standby_interval=1.0)
    healthy = OutboxRelay(pool, nc, standby_interval=1.0)
    async with running(stalled):

        async def leads() -> bool:
            return stalled.leads == 1

        await eventually(leads)
        async with running(healthy):
            await eventually(lambda: outbox_empty(pool), within=30)
            # Counted here: once the standby stops, the stalled one may lead again.
            leads_while_both_ran = stalled.leads
    # It stepped down once and stayed away until the standby had taken the lock.
    assert leads_while_both_ran == 1
    assert healthy.published == len(appended) and stalled.published == 0
    assert sorted(event_ids(await stream_messages(nc))) == sorted(str(i) for i in appended)


async def test_a_republished_event_is_dropped_by_the_duplicate_window(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    store = PostgresEventStore(pool)
    async with running(OutboxRelay(pool, nc)):
        ids = await append_lifecycle(store, uuid.uuid4())
        await eventually(lambda: outbox_empty(pool))
    # As if the relay had crashed after the acks, before deleting its outbox rows.
    await pool.execute("INSERT INTO outbox SELECT global_position FROM events")
    async with running(OutboxRelay(pool, nc)):
        await eventually(lambda: outbox_empty(pool))
    assert event_ids(await stream_messages(nc)) == [str(i) for i in ids]


async def test_the_stream_is_created_and_updated_from_code(nc: NATS) -> None:
    js = nc.jetstream()
    info = await ensure_events_stream(js)
    assert info.config.subjects == [EVENTS_SUBJECTS]
    assert info.config.storage == StorageType.FILE
    assert info.config.duplicate_window == pytest.approx(DUPLICATE_WINDOW_SECONDS)
    await js.update_stream(events_stream_config().evolve(duplicate_window=10.0, max_msgs=10_000))
    info = await ensure_events_stream(js)
    assert info.config.duplicate_window == pytest.approx(DUPLICATE_WINDOW_SECONDS)
    assert info.config.max_msgs == 10_000  # an operator's setting the code does not manage
    assert (await ensure_events_stream(js)).config == info.config


async def test_a_stream_is_not_grown_past_one_replica_on_a_server_that_is_not_clustered(
    nc: NATS,
) -> None:
    """NATS 2.9 takes that update (and claims three copies that do not exist); 2.10+ refuse
    it. Either way the process is told its configuration is wrong, and the stream is left."""
    js = nc.jetstream()
    await ensure_events_stream(js, 1)
    with pytest.raises(StreamConfigConflict, match="3 replicas: the NATS server is not clustered"):
        await ensure_events_stream(js, 3)
    assert (await js.stream_info(EVENTS_STREAM)).config.num_replicas == 1


async def test_a_stream_of_another_storage_is_refused_in_words(nc: NATS) -> None:
    js = nc.jetstream()
    await js.add_stream(events_stream_config().evolve(storage=StorageType.MEMORY))
    with pytest.raises(StreamConfigConflict, match="has storage memory, the code wants file"):
        await ensure_events_stream(js)


@pytest.mark.fault
async def test_relays_cut_off_at_random_points_lose_and_duplicate_nothing(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    store = PostgresEventStore(pool)
    appending = asyncio.create_task(append_many(store, 1000, writers=8))
    crashes = 0
    while crashes < 10 or not appending.done():
        # A cancelled task stops wherever it is: between publish and delete, mid-batch...
        task = asyncio.create_task(OutboxRelay(pool, nc, batch_size=64).run(asyncio.Event()))
        await asyncio.sleep(random.uniform(0.01, 0.15))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        crashes += 1
    appended = await appending
    # Then one that is left alone publishes whatever the others did not.
    async with running(OutboxRelay(pool, nc)):
        await eventually(lambda: outbox_empty(pool))
    assert sorted(event_ids(await stream_messages(nc))) == sorted(str(i) for i in appended)


async def test_events_sent_again_are_stored_once_and_counted_as_duplicates(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    """As after a crash between the acks and the outbox delete: the rows come back."""
    store = PostgresEventStore(pool)

    def duplicates() -> float:
        return REGISTRY.get_sample_value("clinic_relay_duplicates_total") or 0.0

    appended = await append_many(store, 10, writers=2)
    async with running(OutboxRelay(pool, nc)):
        await eventually(lambda: outbox_empty(pool))
    before = duplicates()
    await pool.execute("INSERT INTO outbox SELECT global_position FROM events ORDER BY 1 LIMIT 7")
    async with running(OutboxRelay(pool, nc)):
        await eventually(lambda: outbox_empty(pool))
    assert duplicates() - before == 7
    assert sorted(event_ids(await stream_messages(nc))) == sorted(str(i) for i in appended)


async def test_a_standby_reports_the_backlog_waiting_now(pool: asyncpg.Pool, nc: NATS) -> None:
    """Another process leads (it holds the lock) and publishes nothing: a standby's gauges
    say what waits, not the last batch it read when it led (or nothing)."""
    store = PostgresEventStore(pool)

    def reported() -> float | None:
        return REGISTRY.get_sample_value("clinic_relay_backlog_events")

    async with pool.acquire() as leader:
        assert await outbox.try_lead(leader)
        RELAY_BACKLOG.set(12_345)  # process-wide: as a relay that stepped down left it
        RELAY_LAG_SECONDS.set(0)
        await append_many(store, 30, writers=4)  # more than a batch
        async with running(OutboxRelay(pool, nc, batch_size=20, standby_interval=0.05)):

            async def counted() -> bool:
                return reported() == 20.0  # counted up to a batch: at least that many

            await eventually(counted, within=10)
            await eventually(lambda: lag_reported(at_least=0.001), within=10)
            await pool.execute(
                "DELETE FROM outbox WHERE global_position IN"
                " (SELECT global_position FROM outbox ORDER BY 1 OFFSET 5)"
            )

            async def recounted() -> bool:
                return reported() == 5.0

            await eventually(recounted, within=10)
        await outbox.step_down(leader)


@pytest.mark.fault
async def test_events_appended_while_nats_is_down_arrive_once_it_is_back(
    pool: asyncpg.Pool, nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresEventStore(pool)
    # A small client buffer: while NATS is away, publishing is soon refused outright
    # (rather than buffered), which must count as a failed batch too.
    nc = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, pending_size=64_000
    )

    async def stepped_down() -> bool:
        return any(
            isinstance(r.args, tuple) and "RelayStalled" in str(r.args) for r in caplog.records
        )

    RELAY_LAG_SECONDS.set(0)  # process-wide: a value an earlier test left must not count
    try:
        async with running(OutboxRelay(pool, nc, ack_timeout=0.2)):
            appended = await append_many(store, 200, writers=4)
            nats_server.stop()
            appended += await append_many(store, 200, writers=4)  # the outbox buffers them
            assert not await outbox_empty(pool)
            # Unacked for long enough, the active relay gives up its lock and retries.
            await eventually(stepped_down, within=30)
            assert "publishes refused" in caplog.text  # the path this client takes
            # Not leading, it still measures the outbox: the lag alert can fire.
            waited = await outbox.oldest_age(pool)
            assert waited > 0
            await eventually(lambda: lag_reported(at_least=waited), within=30)
            nats_server.start()
            await eventually(lambda: outbox_empty(pool))
        messages = await stream_messages(nc)
    finally:
        await nc.close()
    assert sorted(event_ids(messages)) == sorted(str(i) for i in appended)


@pytest.mark.fault
async def test_publishes_refused_while_connected_neither_stall_the_relay_nor_lose_events(
    pool: asyncpg.Pool,
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each refused ``publish_async`` keeps a slot of its context's pending limit (24 here:
    3 batches of 8); 30 refusals would leave the relay waiting forever on that context."""
    store = PostgresEventStore(pool)
    nc = await nats.connect(nats_server.url)
    publish = nc.publish
    refusals = 30

    async def refusing(subject: str, *args: Any, **kwargs: Any) -> None:
        nonlocal refusals
        if subject.startswith("appointments.v1.events.") and refusals > 0:
            refusals -= 1
            raise nats.errors.OutboundBufferLimitError
        await publish(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "publish", refusing)
    try:
        appended = await append_many(store, 100, writers=4)
        async with running(OutboxRelay(pool, nc, batch_size=8, in_flight=2, ack_timeout=0.5)):
            await eventually(lambda: outbox_empty(pool), within=60)
        # Each refusal replaced the relay's JetStream context; the replaced ones' reply
        # inboxes are unsubscribed, not kept for the connection's life. (The other
        # wildcard inbox is the connection's own, for requests.)
        requests = bytes(nc._resp_sub_prefix or b"").decode() + "*"
        reply_inboxes = [
            sub.subject
            for sub in nc._subs.values()
            if sub.subject.startswith(nc._inbox_prefix.decode())
            and sub.subject.endswith(".*")
            and sub.subject != requests
        ]
        messages = await stream_messages(nc)
    finally:
        await nc.close()
    assert refusals == 0 and "publishes refused" in caplog.text
    assert len(reply_inboxes) == 1, reply_inboxes
    assert sorted(event_ids(messages)) == sorted(str(i) for i in appended)


async def test_unpublished_after_sees_nothing_while_a_late_commit_waits_below_it(
    pool: asyncpg.Pool,
) -> None:
    store = PostgresEventStore(pool)
    async with pool.acquire() as conn:
        held = conn.transaction()
        await held.start()
        late = await append_lifecycle(PostgresEventStore(conn), uuid.uuid4())
        await append_many(store, 10, writers=2)
        rows = await outbox.oldest_unpublished(pool, 5)  # "in flight"
        cursor = rows[-1]["global_position"]
        after = await outbox.unpublished_after(pool, cursor, len(rows), 100)
        assert len(after) == 15  # nothing committed late below the cursor yet
        await held.commit()
    # The late rows sit below the cursor now: the next batch waits for a scan from the start.
    assert await outbox.unpublished_after(pool, cursor, len(rows), 100) == []
    oldest = [row["event_id"] for row in await outbox.oldest_unpublished(pool, 100)]
    assert oldest[:2] == late and len(oldest) == 22


async def test_late_commits_below_batches_in_flight_keep_each_appointment_in_order(
    pool: asyncpg.Pool, nc: NATS
) -> None:
    store = PostgresEventStore(pool)
    relay = OutboxRelay(pool, nc, batch_size=8, in_flight=2, poll_interval=0.01)
    late_pairs: list[list[uuid.UUID]] = []

    async def late_lifecycle() -> None:
        """Scheduled in a transaction that commits late, then cancelled at once."""
        async with pool.acquire() as conn:
            clinic_id, stream = uuid.uuid4(), uuid.uuid4()
            scheduled = recorded(booking(clinic_id))
            async with conn.transaction():
                await PostgresEventStore(conn).append(stream, 0, [scheduled])
                await asyncio.sleep(random.uniform(0.01, 0.2))  # others commit meanwhile
            cancelled = recorded(cancellation(clinic_id))
            await store.append(stream, 1, [cancelled])
            late_pairs.append([scheduled.event_id, cancelled.event_id])

    async def late_ones() -> None:
        for _ in range(10):
            await asyncio.gather(*(late_lifecycle() for _ in range(4)))

    async with running(relay):
        appended, _ = await asyncio.gather(append_many(store, 600, writers=8), late_ones())
        await eventually(lambda: outbox_empty(pool))
    published = event_ids(await stream_messages(nc))
    expected = appended + [i for pair in late_pairs for i in pair]
    assert len(published) == len(expected) == 1280  # each once
    assert sorted(published) == sorted(str(i) for i in expected)
    order = {event_id: n for n, event_id in enumerate(published)}
    for scheduled_id, cancelled_id in late_pairs:
        assert order[str(scheduled_id)] < order[str(cancelled_id)]


async def test_a_relay_of_this_process_is_rung_in_process_without_notify(
    pool: asyncpg.Pool, nc: NATS, database_url: str
) -> None:
    notified: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(CHANNEL, lambda *args: notified.append(args[2]))
    doorbell = OutboxDoorbell(pool)
    store = RingingEventStore(PostgresEventStore(pool), doorbell)
    try:
        # Without the ring the relay would sleep out its poll interval (an hour).
        async with running(OutboxRelay(pool, nc, poll_interval=3600, doorbell=doorbell)):
            await eventually(lambda: attached(doorbell))
            ids = await append_lifecycle(store, uuid.uuid4())  # type: ignore[arg-type]
            await eventually(lambda: outbox_empty(pool), within=30)
        await listener.execute("SELECT 1")  # any notification has been delivered by now
    finally:
        await listener.close()
    assert notified == []
    assert event_ids(await stream_messages(nc)) == [str(i) for i in ids]


async def test_notify_wakes_a_relay_of_another_process_even_beside_a_standby(
    pool: asyncpg.Pool, nc: NATS, database_url: str, nats_url: str
) -> None:
    other_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    other_nc = await nats.connect(nats_url)
    # "This process": appends ring its doorbell; its relay stands by.
    doorbell = OutboxDoorbell(pool)
    store = RingingEventStore(PostgresEventStore(pool), doorbell)
    active = OutboxRelay(other_pool, other_nc, poll_interval=3600)
    try:
        async with running(active):
            await eventually(lambda: leading(pool))
            async with running(OutboxRelay(pool, nc, poll_interval=3600, doorbell=doorbell)):
                await asyncio.sleep(0.2)  # it tried the lock and stands by
                assert not doorbell.relay_attached
                ids = await append_lifecycle(store, uuid.uuid4())  # type: ignore[arg-type]
                await eventually(lambda: outbox_empty(pool), within=30)
    finally:
        await other_nc.close()
        await other_pool.close()
    assert active.published == 2
    assert event_ids(await stream_messages(nc)) == [str(i) for i in ids]


async def leading(pool: asyncpg.Pool) -> bool:
    """Some session holds the relay lock of this database (a relay leads). Advisory locks
    belong to a database, but ``pg_locks`` shows every database's: tests running beside
    this one on other databases hold theirs."""
    return bool(
        await pool.fetchval(
            "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND (classid::bigint << 32 | objid::bigint) = $1 AND objsubid = 1)",
            outbox.RELAY_LOCK_ID,
        )
    )


async def attached(doorbell: OutboxDoorbell) -> bool:
    return doorbell.relay_attached


async def test_the_leadership_session_is_ended_soon_after_its_client_stops_answering(
    database_url: str,
) -> None:
    # A relay whose node vanished (no FIN) keeps its lock as long as the server keeps its
    # session: with PostgreSQL's defaults ~2 h idle, ~15 min with data unacknowledged.
    pool = await create_session_pool(database_url, max_size=1)
    try:
        for _ in range(2):  # as connected, then after the release's reset
            async with pool.acquire() as conn:
                settings = await conn.fetch(
                    "SELECT name, setting, source FROM pg_settings WHERE name LIKE 'tcp_%'"
                )
                over_tcp = await conn.fetchval("SELECT inet_client_addr() IS NOT NULL")
                await conn.execute("SET tcp_keepalives_idle = 7200")  # the reset undoes it
            by_name = {r["name"]: r for r in settings}
            for name, value in SESSION_KEEPALIVES.items():
                assert by_name[name]["source"] == "client", name
                if over_tcp:  # on a Unix socket the server shows 0: no TCP to keep alive
                    assert by_name[name]["setting"] == value, name
    finally:
        await pool.close()


async def test_a_nats_without_jetstream_is_named_in_the_relay_and_projector_logs(
    pool: asyncpg.Pool, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Commands still succeed (the outbox keeps their events), so the log is where an
    # operator learns why nothing is published.
    server = EmbeddedNats(tmp_path / "nats", jetstream=False, die_with_parent=True).start()
    conn = await nats.connect(server.url)
    stop = asyncio.Event()
    roles = [
        asyncio.create_task(OutboxRelay(pool, conn, poll_interval=0.01).run(stop)),
        asyncio.create_task(VisitsProjector(pool, conn).run(stop)),
    ]
    try:
        hint = "JetStream does not answer: is it enabled on the NATS server"
        await eventually(
            lambda: _true(
                any(hint in r.getMessage() and "relay" in r.getMessage() for r in caplog.records)
                and any(
                    hint in r.getMessage() and "projector" in r.getMessage() for r in caplog.records
                )
            ),
            within=20,
        )
    finally:
        stop.set()
        _, late = await asyncio.wait(roles, timeout=10)
        for task in late:
            task.cancel()
        await asyncio.gather(*roles, return_exceptions=True)
        await conn.close()
        server.stop()


async def _true(value: bool) -> bool:
    return value


async def test_fetching_a_batch_reads_only_the_unpublished_events(pool: asyncpg.Pool) -> None:
    """Between autovacuum runs an outbox with many deleted rows looks big to the planner;
    joined to ``events``, the fetch became a merge join that read every event from the
    first one on, each time (~5 ms at 12,000 events, growing with the store). The
    outbox's positions are now taken first and their events looked up by key."""
    async with pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO events (event_id, stream_id, stream_version, clinic_id, type,
                                schema_version, data, occurred_at)
            SELECT gen_random_uuid(), gen_random_uuid(), 1, gen_random_uuid(),
                   'AppointmentScheduled', 1, '{}', now()
            FROM generate_series(1, 20000)
            """
        )
        await conn.execute("INSERT INTO outbox SELECT global_position FROM events")
        await conn.execute("ANALYZE events, outbox")  # the planner now expects 20,000 rows
        last = await conn.fetchval("SELECT max(global_position) FROM events")
        await conn.execute("DELETE FROM outbox WHERE global_position <= $1", last - 5)
        statements = {  # as the relay's prepared statements run them, both ways
            "oldest": (outbox._BATCH, "2000"),
            "next": (outbox._NEXT_BATCH, f"{last - 3}, 2, 2000"),
            "age": (outbox._OLDEST_AGE, ""),
        }
        for name, (sql, args) in statements.items():
            await conn.execute(f"PREPARE {name} AS {sql}")
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                execute = f"EXECUTE {name}({args})" if args else f"EXECUTE {name}"
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {execute}")
                top = msgspec.json.decode(plan)[0]["Plan"]
                read = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
                # The outbox's pages (its 20,000 dead entries are still in its index):
                # ~150 at the first fetch, ~70 after. The join read ~460, every time.
                assert read < 250, (name, mode, read, plan)
        await conn.execute("RESET plan_cache_mode")
        rows = await outbox.oldest_unpublished(conn, 2000)
        assert [row["global_position"] for row in rows] == list(range(last - 4, last + 1))
        after = await outbox.unpublished_after(conn, last - 3, 2, 2000)
        assert [row["global_position"] for row in after] == list(range(last - 2, last + 1))
        assert await outbox.unpublished_after(conn, last - 3, 1, 2000) == []


@pytest.mark.parametrize(
    ("others", "batching"),
    [
        (0, {}),
        # Another appointment's booking in the batch, acked: only it leaves the outbox.
        (1, {}),
        # Two batches in flight: the next one must not carry the refused one's successor.
        (0, {"batch_size": 1, "in_flight": 2}),
    ],
    ids=["alone", "batch-partly-acked", "two-batches-in-flight"],
)
async def test_a_refused_publish_is_not_overtaken_by_the_next_event_of_its_appointment(
    pool: asyncpg.Pool, nc: NATS, others: int, batching: dict[str, int]
) -> None:
    store = PostgresEventStore(pool)
    clinic, stream = uuid.uuid4(), uuid.uuid4()
    for _ in range(others):
        await store.append(uuid.uuid4(), 0, [recorded(booking(clinic))])
    await store.append(stream, 0, [recorded(booking(clinic))])
    await store.append(stream, 1, [recorded(cancellation(clinic))])
    relay = OutboxRelay(pool, nc, ack_timeout=1.0, **batching)
    real = relay._js.publish_async
    refused = False

    async def publish_async(subject: str, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        nonlocal refused
        if subject.endswith(f"{stream}.scheduled") and not refused:
            # JetStream refuses this one publish (a 503 while the stream's leader is being
            # elected); the next, a moment later, would be stored.
            refused = True
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(nats.js.errors.ServiceUnavailableError())
            return future
        return await real(subject, *args, **kwargs)

    relay._js.publish_async = publish_async  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:

        async def drained() -> bool:
            return not await pool.fetchval("SELECT EXISTS (SELECT FROM outbox)")

        await eventually(drained, within=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert refused
    sub = await nc.jetstream().pull_subscribe(
        EVENTS_SUBJECTS,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, filter_subject=EVENTS_SUBJECTS),
    )
    messages = await sub.fetch(2 + others, timeout=5)
    envelopes = [msgspec.json.decode(m.data, type=EventEnvelope) for m in messages]
    versions = [e.stream_version for e in envelopes if e.stream_id == stream]
    assert versions == [1, 2]  # domain.md: one appointment's events in version order
    assert len(envelopes) == 2 + others  # nothing lost, nothing twice
