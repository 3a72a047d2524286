"""Reminder timers against a real NATS and PostgreSQL: a timer never fires for an
appointment whose cancel or start is on the APPOINTMENTS stream, applied by the consumer
or not (a restart with a backlog, an event ahead of its booking); the stream is asked per
appointment, so an event the consumer keeps handing back delays no other appointment's
reminders; a steady load never starves the timers; and a 24 h reminder that goes out
late says the day right."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from contracts.subjects import EVENTS_STREAM
from services.notifications.reminders import ReminderScheduler
from services.notifications.runtime import Tuning
from services.notifications.store import NotificationStore
from tests.integration.test_notifications_harness import (
    TEST_TUNING,
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures

#: The harness's visit (Tue 15 Jan 2030 14:00 UTC, 15:00 in Berlin) opens at 13:45.
WINDOW_OPENS = datetime(2030, 1, 15, 13, 45, tzinfo=UTC)


async def _visit_ready(clinic: Clinic, booking: Booking) -> list[tuple[str, str]]:
    """The visit-ready deliveries of the booking's patient: (channel, status)."""
    return [
        (r["channel"], r["status"])
        for r in await clinic.deliveries()
        if r["kind"] == "visit-ready" and r["recipient_id"] == booking.patient_id
    ]


async def _pushed(clinic: Clinic, booking: Booking, kind: str) -> list[str]:
    """Titles of the booking's pushes of ``kind``."""
    return [
        p.title
        for p in await clinic.pushes()
        if p.appointment_id == booking.appointment_id and p.kind == kind
    ]


@pytest.mark.parametrize("backlog", [0, 30])
@pytest.mark.parametrize("news", ["cancelled", "started"])
async def test_news_published_while_the_service_was_down_beats_its_reminders(
    clinic: Clinic, backlog: int, news: str
) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    # Down (a deploy, a crash loop) while other bookings come in, then the news.
    clinic.clock.now = WINDOW_OPENS + timedelta(minutes=-5 if news == "cancelled" else 1)
    for _ in range(backlog):
        other = Booking(starts_at=WINDOW_OPENS + timedelta(days=2))
        clinic.know(other)
        await clinic.publish(other.scheduled(clinic.clock()), other.clinic_id)
    if news == "cancelled":
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
    else:
        await clinic.publish(booking.started(clinic.clock()), booking.clinic_id)
    clinic.clock.now = WINDOW_OPENS + timedelta(minutes=2)  # back up, the timer long due
    async with clinic.running():
        await clinic.wait_settled()
    assert await _pushed(clinic, booking, "visit-ready") == []
    assert await _visit_ready(clinic, booking) == []
    timers = "SELECT count(*) FROM notification_timers WHERE appointment_id = $1"
    assert await clinic.db.fetchval(timers, booking.appointment_id) == 0


async def test_a_cancel_handed_back_ahead_of_its_booking_means_no_visit_ready(
    clinic: Clinic,
) -> None:
    """The cancel reaches the stream before its booking (which is booked inside its start
    window, so its visit-ready is due at once): the consumer hands the cancel back and
    applies the booking; the timer, due at once, is dropped since the cancel is on the
    stream, and the cancel's redelivery announces the cancellation."""
    booking = Booking()
    clinic.know(booking)
    clinic.clock.now = WINDOW_OPENS + timedelta(minutes=1)
    scheduled = booking.scheduled(clinic.clock())
    cancelled = booking.cancelled(clinic.clock() + timedelta(seconds=1), booking.patient)
    await clinic.publish(cancelled, booking.clinic_id)
    await clinic.publish(scheduled, booking.clinic_id)
    async with clinic.running():
        await clinic.wait_settled()
    assert await _pushed(clinic, booking, "visit-ready") == []
    assert await _visit_ready(clinic, booking) == []
    assert await _pushed(clinic, booking, "appointment-cancelled") == ["Visit cancelled"] * 2


async def test_a_cancel_handed_back_again_and_again_delays_no_other_appointment(
    clinic: Clinic,
) -> None:
    """A cancel of an appointment never booked here (its booking lost, say) is handed back
    delivery after delivery, for minutes before it is parked: an unrelated appointment's
    visit-ready still goes out within a poll or two of being due."""
    tuning = replace(TEST_TUNING, redelivery_backoff=(1.0, 120.0), max_deliver=10)
    booking, orphan = Booking(), Booking()
    clinic.know(booking)
    async with clinic.running(tuning=tuning):
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        await clinic.publish(orphan.cancelled(clinic.clock(), orphan.patient), orphan.clinic_id)
        await eventually(lambda: _handed_back_again(clinic), what="the cancel handed back")
        clinic.clock.now = WINDOW_OPENS
        due = time.monotonic()
        await eventually(lambda: _has_visit_ready(clinic, booking), within=10.0, what="visit-ready")
        waited = time.monotonic() - due
        info = await clinic.js.consumer_info(EVENTS_STREAM, tuning.consumer_name)
        assert info.num_ack_pending == 1  # the cancel is still handed back, not parked
    assert waited < 5.0  # the old gate: until the cancel was parked (minutes)
    assert await _pushed(clinic, booking, "visit-ready") == ["Your visit can start now"]
    parked = await clinic.db.fetchval("SELECT count(*) FROM notification_parked_messages")
    assert parked == 0


async def _handed_back_again(clinic: Clinic) -> bool:
    info = await clinic.js.consumer_info(EVENTS_STREAM, TEST_TUNING.consumer_name)
    return bool(info.num_redelivered and info.num_ack_pending)


async def test_a_steady_load_does_not_starve_the_timers(clinic: Clinic) -> None:
    """Events keep arriving (the consumer always has some in flight); a due timer still
    fires within seconds."""
    booking = Booking()
    clinic.know(booking)
    stop = asyncio.Event()
    published = 0

    async def load() -> None:
        nonlocal published
        while not stop.is_set():
            other = Booking(starts_at=WINDOW_OPENS + timedelta(days=2))
            await clinic.publish(other.scheduled(clinic.clock()), other.clinic_id)
            published += 1
            await asyncio.sleep(0.005)

    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        loader = asyncio.create_task(load())
        try:
            await eventually(lambda: _published_at_least(published, 50), what="a load")
            clinic.clock.now = WINDOW_OPENS
            due = time.monotonic()
            await eventually(
                lambda: _has_visit_ready(clinic, booking), within=10.0, what="visit-ready"
            )
            waited = time.monotonic() - due
            running = not loader.done()
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await loader
        assert running
        assert waited < 5.0
        await clinic.wait_settled()
    assert await _pushed(clinic, booking, "visit-ready") == ["Your visit can start now"]


async def _published_at_least(count: int, least: int) -> bool:
    return count >= least


async def _has_visit_ready(clinic: Clinic, booking: Booking) -> bool:
    return bool(await _pushed(clinic, booking, "visit-ready"))


async def test_a_24h_reminder_that_goes_out_late_says_today(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    # Down across the reminder's time; back up an hour before the visit (14:00 in Berlin).
    clinic.clock.now = booking.starts_at - timedelta(hours=1)
    async with clinic.running():
        await eventually(lambda: _has_reminder(clinic, booking), what="the late 24 h reminder")
        await clinic.wait_settled()
    assert await _pushed(clinic, booking, "reminder-24h") == ["Visit today"]
    assert await _pushed(clinic, booking, "visit-ready") == []


async def _has_reminder(clinic: Clinic, booking: Booking) -> bool:
    return bool(await _pushed(clinic, booking, "reminder-24h"))


TIMERS = 5000


class _NeverEnded:
    """A stream that holds no cancel or start."""

    async def ended(self, clinic_id: uuid.UUID, appointment_id: uuid.UUID) -> bool:
        return False


async def test_a_backlog_of_timers_due_at_the_same_times_is_all_handled(database_url: str) -> None:
    """Hundreds of timers due at each of a few slot times (after an outage), and a plan that
    sorts them (no index scan): the round claims exactly the timers it asked the stream
    about, so none is left behind (two queries picking different ties handled none, again
    and again)."""
    now = datetime(2030, 1, 15, 12, 0, tzinfo=UTC)
    slot = random.Random(8)
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=2,
        server_settings={"enable_indexscan": "off", "enable_bitmapscan": "off"},
    )
    try:
        appointments = [(uuid.uuid4(), uuid.uuid4()) for _ in range(TIMERS)]
        await pool.executemany(
            "INSERT INTO notification_appointments"
            " VALUES ($1, $2, $3, $4, $5, 30, 'UTC', 'cancelled', $6)",
            [
                (a, c, uuid.uuid4(), uuid.uuid4(), now + timedelta(days=2), uuid.uuid4())
                for a, c in appointments
            ],
        )
        await pool.executemany(
            "INSERT INTO notification_timers VALUES ($1, 'visit-ready', $2, $3, $4)",
            [
                (
                    a,
                    uuid.uuid4(),
                    now - timedelta(minutes=30 * slot.randrange(8)),
                    now + timedelta(days=3),
                )
                for a, _ in appointments
            ],
        )
        await pool.execute("ANALYZE")
        scheduler = ReminderScheduler(
            NotificationStore(pool), _NeverEnded(), lambda: now, ["push"], Tuning(), lambda: None
        )
        rounds = 0
        while await scheduler.fire_due():
            rounds += 1
            assert rounds <= TIMERS // 100, "more rounds than timers / 100 a round"
        assert await pool.fetchval("SELECT count(*) FROM notification_timers") == 0
    finally:
        await pool.close()
