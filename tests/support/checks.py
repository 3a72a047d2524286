"""What the fault tests prove at the end, read back from PostgreSQL and JetStream.

* :func:`events_exactly_once`: every committed event is on ``APPOINTMENTS`` exactly once per
  ``event_id`` (counted by ``Nats-Msg-Id``), and nothing else is.
* :func:`visits_differences`: the visits view against a rebuild — every stream of the event
  store folded with the projector's own pure ``project``, as ``rebuild-visits`` does.
* :func:`notifications_exactly_once`: every notification the events call for exists once,
  its delivery was sent, and ``NOTIFICATIONS`` holds it exactly once.

Every wait is bounded (:func:`wait_for`), and fails the test naming what never happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import asyncpg
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.events import AppointmentCancelled, AppointmentScheduled, decode_event
from contracts.subjects import (
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    NOTIFICATIONS_STREAM,
    NOTIFICATIONS_SUBJECTS,
)
from services.appointments.adapters.postgres.event_store import envelope_from_row
from services.appointments.adapters.postgres.visits import row_of
from services.appointments.projector import CONSUMER as PROJECTOR
from services.appointments.service_layer.visits import Outcome, VisitRow, project
from services.notifications.delivery_store import ABANDONED_IN_DOUBT
from services.notifications.domain import appointment_of, on_cancelled, on_scheduled

_EVENTS = """SELECT global_position, event_id, stream_id, stream_version, clinic_id, type,
       schema_version, data, occurred_at, correlation_id, causation_id
FROM events ORDER BY stream_id, stream_version"""


async def wait_for(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.1
) -> float:
    """Poll ``check`` until it holds; the seconds it took. Fails after ``within`` seconds."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within:.0f}s: {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started


async def read_stream(js: JetStreamContext, stream: str, subjects: str) -> list[Msg]:
    """Every message of ``stream`` in stream order, read with a throwaway consumer (made
    anew when JetStream cannot serve it: in a cluster with a node hung, a new consumer
    can be without a leader for a while, and pulls then answer 503)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            total = (await js.stream_info(stream)).state.messages
            return await _read_once(js, stream, subjects, total, deadline)
        except (
            nats.js.errors.ServiceUnavailableError,
            nats.errors.NoRespondersError,
            TimeoutError,
        ):
            assert time.monotonic() < deadline, f"{stream} could not be read"
            await asyncio.sleep(0.5)


async def _read_once(
    js: JetStreamContext, stream: str, subjects: str, total: int, deadline: float
) -> list[Msg]:
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0
    )
    sub = await js.pull_subscribe(subjects, stream=stream, config=config)
    messages: list[Msg] = []
    try:
        while len(messages) < total:
            assert time.monotonic() < deadline, f"read {len(messages)} of {total} on {stream}"
            try:
                messages.extend(await sub.fetch(min(1000, total - len(messages)), timeout=5))
            except TimeoutError:
                continue
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return messages


def _msg_ids(messages: list[Msg]) -> Counter[str]:
    return Counter((msg.headers or {}).get("Nats-Msg-Id", "") for msg in messages)


async def events_exactly_once(pool: asyncpg.Pool, js: JetStreamContext) -> int:
    """Assert every committed event is on the stream exactly once; the number of events."""
    committed = {str(r["event_id"]) for r in await pool.fetch("SELECT event_id FROM events")}
    messages = await read_stream(js, EVENTS_STREAM, EVENTS_SUBJECTS)
    on_stream = _msg_ids(messages)
    repeated = {event_id: n for event_id, n in on_stream.items() if n > 1}
    assert not repeated, f"{len(repeated)} events on the stream more than once: {repeated}"
    missing = committed - set(on_stream)
    assert not missing, f"{len(missing)} committed events never reached the stream"
    unknown = set(on_stream) - committed
    assert not unknown, f"{len(unknown)} messages on the stream are no committed event"
    for msg in messages:  # the envelope is the event its Nats-Msg-Id names
        assert msgspec.json.decode(msg.data)["event_id"] == (msg.headers or {})["Nats-Msg-Id"]
    return len(committed)


async def folded_visits(pool: asyncpg.Pool) -> dict[uuid.UUID, VisitRow]:
    """The visits a rebuild makes: every stream folded with the projector's ``project``."""
    rows: dict[uuid.UUID, VisitRow | None] = {}
    for record in await pool.fetch(_EVENTS):
        envelope = envelope_from_row(record)
        outcome, row = project(rows.get(envelope.stream_id), envelope)
        if outcome in (Outcome.APPLIED, Outcome.SKIPPED):
            rows[envelope.stream_id] = row
    return {key: row for key, row in rows.items() if row is not None}


async def visits_differences(pool: asyncpg.Pool) -> list[str]:
    """How the visits view differs from a rebuild (empty: equal)."""
    rebuilt = await folded_visits(pool)
    view = {r["appointment_id"]: row_of(r) for r in await pool.fetch("SELECT * FROM visits")}
    differences = [f"missing {key}" for key in rebuilt.keys() - view.keys()]
    differences += [f"not in the events: {key}" for key in view.keys() - rebuilt.keys()]
    differences += [
        f"{key}: view {view[key]} != rebuild {row}"
        for key, row in rebuilt.items()
        if key in view and view[key] != row
    ]
    return differences


async def parked(pool: asyncpg.Pool) -> int:
    """Messages the projector and the notification service parked."""
    return int(
        await pool.fetchval(
            "SELECT (SELECT count(*) FROM parked_messages)"
            " + (SELECT count(*) FROM notification_parked_messages)"
        )
    )


async def consumer_idle(js: JetStreamContext, consumer: str) -> bool:
    """The durable consumer has nothing left to deliver and nothing unacknowledged."""
    try:
        info = await js.consumer_info(EVENTS_STREAM, consumer)
    except (NotFoundError, nats.js.errors.ServiceUnavailableError, TimeoutError):
        return False  # not made yet, or JetStream electing a leader (a node hung): ask again
    return not info.num_pending and not info.num_ack_pending


async def appointments_caught_up(pool: asyncpg.Pool, js: JetStreamContext) -> bool:
    """The outbox is empty and the projector applied everything the stream holds."""
    if await pool.fetchval("SELECT EXISTS (SELECT FROM outbox)"):
        return False
    return await consumer_idle(js, PROJECTOR) and not await visits_differences(pool)


async def notifications_caught_up(pool: asyncpg.Pool, js: JetStreamContext) -> bool:
    """The consumer is idle, no timer is due and no delivery waits."""
    busy = await pool.fetchval(
        """SELECT EXISTS (SELECT FROM notification_deliveries
                          WHERE status IN ('pending', 'sending'))
               OR EXISTS (SELECT FROM notification_timers WHERE due_at <= now())"""
    )
    return not busy and await consumer_idle(js, "notifications")


async def expected_notifications(pool: asyncpg.Pool) -> dict[uuid.UUID, str]:
    """notification_id -> kind, of every confirmation and cancellation notice the events
    call for (decided with the notification service's own pure functions)."""
    expected: dict[uuid.UUID, str] = {}
    scheduled = {}
    for record in await pool.fetch(_EVENTS):
        envelope = envelope_from_row(record)
        event = decode_event(envelope.type, envelope.schema_version, envelope.data)
        if isinstance(event, AppointmentScheduled):
            appointment = appointment_of(envelope.stream_id, envelope.event_id, event)
            scheduled[envelope.stream_id] = appointment
            planned = on_scheduled(appointment)
        elif isinstance(event, AppointmentCancelled):
            planned = on_cancelled(scheduled[envelope.stream_id], envelope.event_id, event)
        else:
            continue
        expected.update({p.notification_id: p.kind for p in planned})
    return expected


async def notifications_exactly_once(pool: asyncpg.Pool, js: JetStreamContext) -> int:
    """Assert each notification called for exists once, was sent, and is on
    ``NOTIFICATIONS`` exactly once; the number of notifications."""
    expected = await expected_notifications(pool)
    stored = {
        r["notification_id"]: r["kind"]
        for r in await pool.fetch("SELECT notification_id, kind FROM notifications")
    }
    missing = expected.keys() - stored.keys()
    assert not missing, f"{len(missing)} notifications never made"
    extra = {stored[key] for key in stored.keys() - expected.keys()}
    assert extra <= {"visit-ready"}, f"unexpected notifications of kinds {extra}"
    # A reminder the visit's start (or cancel) overtook is given up, never sent; so is a
    # confirmation that failed once (a push refused while a NATS node died, say) and was
    # waiting for its retry: it would arrive after the news. One found so while in doubt
    # (its worker killed as it published) is recorded failed in doubt, not resent.
    outdated = {
        (r["notification_id"], r["channel"])
        for r in await pool.fetch(
            """SELECT d.notification_id, d.channel FROM notification_deliveries d
                   JOIN notifications n USING (notification_id)
               WHERE ((d.status = 'skipped' AND d.last_error LIKE 'after %')
                      OR (d.status = 'failed' AND d.last_error = $1))
                 AND (n.kind IN ('reminder-24h', 'visit-ready')
                      OR (n.kind = 'appointment-confirmed' AND d.attempts > 0))""",
            ABANDONED_IN_DOUBT,
        )
    }
    unsent = [
        r
        for r in await pool.fetch("SELECT * FROM notification_deliveries WHERE status <> 'sent'")
        if (r["notification_id"], r["channel"]) not in outdated
    ]
    assert not unsent, f"{len(unsent)} deliveries not sent: {unsent[:3]}"
    deliveries = await pool.fetchval("SELECT count(*) FROM notification_deliveries")
    assert deliveries == len(stored), f"{deliveries} deliveries of {len(stored)} notifications"
    pushed = _msg_ids(await read_stream(js, NOTIFICATIONS_STREAM, NOTIFICATIONS_SUBJECTS))
    twice = {key: n for key, n in pushed.items() if n > 1}
    assert not twice, f"{len(twice)} notifications pushed more than once"
    given_up = {str(key) for key, channel in outdated if channel == "push"}
    sent = {str(key) for key in stored} - given_up
    # A push given up after a failed attempt may still have reached the stream (its ack
    # was lost with the node): it is there at most once, never required.
    assert sent <= set(pushed) <= sent | given_up, "pushes and notifications differ"
    return len(stored)


async def acknowledged_kept(pool: asyncpg.Pool, acknowledged: dict[uuid.UUID, str]) -> None:
    """Assert every acknowledged command is in the event store: each appointment whose
    booking was acknowledged exists, and a cancel or start acknowledged last holds."""
    rebuilt = await folded_visits(pool)
    lost = [key for key in acknowledged if key not in rebuilt]
    assert not lost, f"{len(lost)} acknowledged bookings are not in the event store"
    wrong = {
        key: (status, rebuilt[key].status)
        for key, status in acknowledged.items()
        if status != "scheduled" and rebuilt[key].status != status
    }
    assert not wrong, f"acknowledged status lost: {list(wrong.items())[:5]}"


async def write_side_consistent(pool: asyncpg.Pool) -> None:
    """Assert no command was half-written: each stream's versions run 1..n, and the
    provider's booked ranges are exactly those of the appointments not cancelled."""
    gaps = await pool.fetchval(
        "SELECT count(*) FROM (SELECT stream_id FROM events GROUP BY stream_id"
        " HAVING max(stream_version) <> count(*)) AS broken"
    )
    assert gaps == 0, f"{gaps} streams with missing versions"
    active = {key for key, row in (await folded_visits(pool)).items() if row.status != "cancelled"}
    booked = {r["appointment_id"] for r in await pool.fetch("SELECT * FROM provider_bookings")}
    assert booked == active, (
        f"bookings without an active appointment: {len(booked - active)},"
        f" active appointments without a booking: {len(active - booked)}"
    )


async def drained_and_whole(
    pool: asyncpg.Pool,
    js: JetStreamContext,
    acknowledged: dict[uuid.UUID, str],
    drain_seconds: float,
) -> dict[str, float]:
    """Wait (bounded) until every event is published, projected and notified, then prove
    nothing was lost, duplicated or half-written: the fault tests' common ending. Returns
    how many events and notifications there are, and how long the drain took."""
    started = time.monotonic()
    await wait_for(lambda: appointments_caught_up(pool, js), drain_seconds, "drained", 0.25)
    await wait_for(lambda: notifications_caught_up(pool, js), drain_seconds, "notified")
    drained = time.monotonic() - started
    events = await events_exactly_once(pool, js)
    assert not await visits_differences(pool)
    await acknowledged_kept(pool, acknowledged)
    await write_side_consistent(pool)
    notifications = await notifications_exactly_once(pool, js)
    assert await parked(pool) == 0
    return {"events": events, "notifications": notifications, "drain_seconds": round(drained, 1)}
