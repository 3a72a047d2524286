"""What the notification service keeps of a visit is forgotten once the visit is long over,
and a replay of its events afterwards sends nothing again."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import asyncpg
import msgspec

from contracts.events import EventEnvelope, decode_event
from services.appointments.domain.rules import Rules
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.retention import forget_ended_visits
from services.notifications.store import NotificationStore
from tests.integration.test_notifications_harness import (
    STARTS_AT,
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)
from tests.support.clock import ManualClock

__all__ = ["clinic", "smtp"]  # fixtures

BOOKED_AT = STARTS_AT - timedelta(days=3)


async def apply(handler: EventHandler, envelope: EventEnvelope) -> Outcome:
    event = decode_event(envelope.type, envelope.schema_version, envelope.data)
    return await handler.apply(envelope, event, envelope.global_position)


async def kept_of(pool: asyncpg.Pool, booking: Booking) -> dict[str, int]:
    """How many rows of each kind the service keeps of ``booking``."""
    counts = await pool.fetchrow(
        """SELECT
             (SELECT count(*) FROM notification_appointments WHERE appointment_id = $1)
                 AS appointments,
             (SELECT count(*) FROM notifications WHERE appointment_id = $1) AS notifications,
             (SELECT count(*) FROM notification_deliveries d JOIN notifications n
                 USING (notification_id) WHERE n.appointment_id = $1) AS deliveries,
             (SELECT count(*) FROM notification_timers WHERE appointment_id = $1) AS timers,
             (SELECT count(*) FROM notification_processed_events WHERE appointment_id = $1)
                 AS marks""",
        booking.appointment_id,
    )
    assert counts is not None
    return dict(counts)


NOTHING = {"appointments": 0, "notifications": 0, "deliveries": 0, "timers": 0, "marks": 0}


async def test_visits_ended_before_the_cutoff_are_forgotten_oldest_first_in_batches(
    pool: asyncpg.Pool,
) -> None:
    clock = ManualClock(BOOKED_AT)
    handler = EventHandler(NotificationStore(pool), clock, Rules(), ["push"], TEST_TUNING)
    await handler.begin()
    oldest = Booking()
    older = Booking(starts_at=STARTS_AT + timedelta(hours=1))
    at_cutoff = Booking(starts_at=STARTS_AT + timedelta(hours=2))  # ends exactly at it
    unsent = Booking()  # ended long ago, but a delivery of it still waits
    abandoned = Booking(starts_at=STARTS_AT + timedelta(minutes=30))  # waited since: unserved
    later = Booking(starts_at=STARTS_AT + timedelta(hours=3))
    bookings = [oldest, older, at_cutoff, unsent, abandoned, later]
    for booking in bookings:
        assert await apply(handler, booking.scheduled(clock())) is Outcome.APPLIED
    assert await apply(handler, older.cancelled(clock(), older.patient)) is Outcome.APPLIED
    cutoff = at_cutoff.starts_at + timedelta(minutes=at_cutoff.duration_minutes)
    await pool.execute(
        """UPDATE notification_deliveries d SET status = 'sent' FROM notifications n
           WHERE n.notification_id = d.notification_id AND n.appointment_id <> ALL($1)""",
        [unsent.appointment_id, abandoned.appointment_id],
    )
    await pool.execute(  # a retry due at the cutoff: still to be tried
        """UPDATE notification_deliveries d SET next_attempt_at = $2 FROM notifications n
           WHERE n.notification_id = d.notification_id AND n.appointment_id = $1""",
        unsent.appointment_id,
        cutoff,
    )
    before = {b.appointment_id: await kept_of(pool, b) for b in bookings}
    assert before[older.appointment_id]["marks"] == 2
    assert before[oldest.appointment_id]["timers"] == 2  # its reminders, never fired here

    assert await forget_ended_visits(pool, cutoff, batch=1) == 1
    assert await kept_of(pool, oldest) == NOTHING
    assert await kept_of(pool, older) == before[older.appointment_id]
    assert await forget_ended_visits(pool, cutoff, batch=10) == 2
    assert await kept_of(pool, older) == NOTHING
    assert await kept_of(pool, abandoned) == NOTHING
    assert await forget_ended_visits(pool, cutoff, batch=10) == 0
    for booking in (at_cutoff, unsent, later):
        assert await kept_of(pool, booking) == before[booking.appointment_id]


async def test_a_replay_of_a_forgotten_visit_sends_nothing_again(pool: asyncpg.Pool) -> None:
    clock = ManualClock(BOOKED_AT)
    handler = EventHandler(NotificationStore(pool), clock, Rules(), ["push"], TEST_TUNING)
    await handler.begin()
    booking = Booking()
    scheduled = booking.scheduled(clock())
    cancelled = booking.cancelled(clock.advance(hours=1), booking.patient)
    for envelope in (scheduled, cancelled):
        assert await apply(handler, envelope) is Outcome.APPLIED
    assert (await kept_of(pool, booking))["notifications"] == 4  # 2 confirmations, 2 notices
    await pool.execute("UPDATE notification_deliveries SET status = 'sent'")  # as workers do
    clock.now = STARTS_AT + timedelta(days=31)
    assert await forget_ended_visits(pool, clock() - timedelta(days=30), batch=10) == 1

    # A consumer created anew delivers the stream from its first event; retention rounds
    # run meanwhile (a replay gives them a batch after another).
    assert await apply(handler, scheduled) is Outcome.APPLIED  # no mark left to stop it
    assert await forget_ended_visits(pool, clock() - timedelta(days=30), batch=10) == 0
    assert await apply(handler, cancelled) is Outcome.APPLIED  # its appointment is there
    again = await kept_of(pool, booking)
    assert again["notifications"] == 0 and again["appointments"] == 1
    clock.advance(days=30, seconds=1)  # a retention after the replay
    assert await forget_ended_visits(pool, clock() - timedelta(days=30), batch=10) == 1
    assert await kept_of(pool, booking) == NOTHING


async def test_the_service_forgets_visits_past_the_configured_retention(clinic: Clinic) -> None:
    over = Booking()
    coming = Booking(starts_at=STARTS_AT + timedelta(days=60))
    for booking in (over, coming):
        clinic.know(booking)
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
    async with clinic.running():
        await clinic.wait_settled()
    assert (await kept_of(clinic.db, over))["notifications"] == 2
    kept_coming = await kept_of(clinic.db, coming)

    clinic.settings = msgspec.structs.replace(clinic.settings, notification_retention_days=7)
    ends = over.starts_at + timedelta(minutes=over.duration_minutes)
    clinic.clock.now = ends + timedelta(days=7, seconds=-1)  # not yet
    tuning = replace(TEST_TUNING, retention_interval=0.05)
    async with clinic.running(tuning=tuning):
        await clinic.wait_settled()
        await eventually(
            lambda: _read_by_retention(clinic, 3), what="three rounds of the retention"
        )
        assert (await kept_of(clinic.db, over))["appointments"] == 1
        clinic.clock.advance(seconds=2)

        async def forgotten() -> bool:
            return await kept_of(clinic.db, over) == NOTHING

        await eventually(forgotten, what="the ended visit to be forgotten")
    assert await kept_of(clinic.db, coming) == kept_coming
    assert len(await clinic.pushes()) == 4  # each confirmation once, nothing since


async def _read_by_retention(clinic: Clinic, rounds: int) -> bool:
    return clinic.clock.reads["Retention.step"] >= rounds
