"""Reminders are timers in PostgreSQL, moved by an injected clock: due ones go out once,
cancelled or started appointments' never do, and none goes out late."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import msgspec

from services.config import load_settings
from services.notifications.delivery_store import ABANDONED_IN_DOUBT
from tests.integration.test_notifications_harness import (
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures

DAY_BEFORE = datetime(2030, 1, 14, 14, 0, tzinfo=UTC)
WINDOW_OPENS = datetime(2030, 1, 15, 13, 45, tzinfo=UTC)


async def _kinds(clinic: Clinic) -> list[str]:
    return sorted(p.kind for p in await clinic.pushes())


async def _scheduler_ran(clinic: Clinic) -> None:
    """Wait until the reminder scheduler has run a whole pass at the clock's present time
    (it reads the clock once a pass, so two more reads mean one pass began after now)."""
    reads = clinic.clock.reads
    seen = reads["ReminderScheduler.fire_due"]

    async def ran() -> bool:
        return reads["ReminderScheduler.fire_due"] >= seen + 2

    await eventually(ran, what="a pass of the reminder scheduler")
    await clinic.wait_settled()


async def _timers(clinic: Clinic) -> int:
    count: int = await clinic.db.fetchval("SELECT count(*) FROM notification_timers")
    return count


async def test_reminders_go_out_when_due_and_not_before(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        assert await _timers(clinic) == 2
        clinic.clock.now = DAY_BEFORE - timedelta(seconds=1)
        await _scheduler_ran(clinic)
        assert await _kinds(clinic) == ["appointment-confirmed"] * 2
        assert await _timers(clinic) == 2
        clinic.clock.now = DAY_BEFORE
        await eventually(lambda: _has(clinic, "reminder-24h"), what="the 24 h reminder")
        clinic.clock.now = WINDOW_OPENS
        await eventually(lambda: _has(clinic, "visit-ready"), what="visit-ready")
        clinic.clock.advance(hours=2)
        await clinic.wait_settled()
    assert await _kinds(clinic) == ["appointment-confirmed"] * 2 + ["reminder-24h", "visit-ready"]
    assert await _timers(clinic) == 0


async def test_cancelling_before_a_reminders_time_means_it_never_goes_out(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        clinic.clock.advance(hours=1)
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
        await clinic.wait_settled()
        assert await _timers(clinic) == 0
        clinic.clock.now = WINDOW_OPENS + timedelta(minutes=1)
        await _scheduler_ran(clinic)
    assert await _kinds(clinic) == ["appointment-cancelled"] * 2 + ["appointment-confirmed"] * 2


async def test_a_started_visits_pending_reminders_are_dropped(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.publish(booking.started(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.now = WINDOW_OPENS
        await _scheduler_ran(clinic)
    assert await _timers(clinic) == 0
    assert await _kinds(clinic) == ["appointment-confirmed"] * 2


async def test_no_24h_reminder_for_a_visit_booked_2h_ahead(clinic: Clinic) -> None:
    booking = Booking(starts_at=clinic.clock() + timedelta(hours=2))
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.advance(hours=1, minutes=45)
        await eventually(lambda: _has(clinic, "visit-ready"), what="visit-ready")
        await clinic.wait_settled()
    assert await _kinds(clinic) == ["appointment-confirmed"] * 2 + ["visit-ready"]


async def test_a_visit_booked_inside_its_start_window_is_ready_at_once(clinic: Clinic) -> None:
    booking = Booking(starts_at=clinic.clock() + timedelta(minutes=10))
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await eventually(lambda: _has(clinic, "visit-ready"), what="visit-ready")
        await clinic.wait_settled()
    assert await _kinds(clinic) == ["appointment-confirmed"] * 2 + ["visit-ready"]


async def test_a_reminder_due_while_the_service_was_down_is_not_sent_late(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    clinic.clock.now = WINDOW_OPENS + timedelta(minutes=5)  # back up inside the window
    async with clinic.running():
        await eventually(lambda: _has(clinic, "visit-ready"), what="visit-ready")
        await clinic.wait_settled()
    assert await _kinds(clinic) == ["appointment-confirmed"] * 2 + ["visit-ready"]
    assert await _timers(clinic) == 0


async def test_the_start_window_setting_moves_visit_ready(clinic: Clinic) -> None:
    clinic.settings = msgspec.structs.replace(clinic.settings, start_window_minutes=30)
    assert load_settings({"CLINIC_START_WINDOW_MINUTES": "30"}).start_window_minutes == 30
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.now = booking.starts_at - timedelta(minutes=30)
        await eventually(lambda: _has(clinic, "visit-ready"), what="visit-ready")
    (ready,) = [p for p in await clinic.pushes() if p.kind == "visit-ready"]
    assert ready.sent_at == booking.starts_at - timedelta(minutes=30)


async def test_two_schedulers_fire_each_reminder_once(clinic: Clinic) -> None:
    bookings = [Booking(starts_at=DAY_BEFORE + timedelta(days=1, minutes=i)) for i in range(15)]
    for booking in bookings:
        clinic.know(booking)
    async with clinic.running(), clinic.running():
        for booking in bookings:
            await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.now = DAY_BEFORE + timedelta(minutes=20)
        await eventually(lambda: _timers_left(clinic, 15), what="every 24 h reminder to fire")
        await clinic.wait_settled()  # and go out: claimed once their windows open, skipped
        clinic.clock.now = WINDOW_OPENS + timedelta(minutes=20)
        await eventually(lambda: _timers_left(clinic, 0), what="every visit-ready to fire")
        await clinic.wait_settled()
    pushes = await clinic.pushes()
    assert len(pushes) == len({p.notification_id for p in pushes}) == 15 * 4
    assert Counter(p.kind for p in pushes) == {
        "appointment-confirmed": 30,
        "reminder-24h": 15,
        "visit-ready": 15,
    }


async def _has(clinic: Clinic, kind: str) -> bool:
    return kind in await _kinds(clinic)


async def _timers_left(clinic: Clinic, count: int) -> bool:
    return await _timers(clinic) == count


async def test_a_reminder_waiting_for_a_retry_is_never_sent_after_a_cancel(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    patient = booking.email_of("patient")
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()  # the confirmations went out
        clinic.sink.refusals[patient] = ["451 4.3.0 Try again later"]
        clinic.clock.now = DAY_BEFORE
        await eventually(lambda: _email_retrying(clinic, "reminder-24h"), what="a retry")
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.advance(hours=2)  # well past the retry's time
        await clinic.wait_settled()
    subjects = [m["Subject"] for m in clinic.sink.to(patient)]
    assert len(subjects) == 2, subjects  # the confirmation and the cancellation
    reminders = [d for d in await clinic.deliveries() if d["kind"] == "reminder-24h"]
    assert {(d["channel"], d["status"]) for d in reminders} >= {("email", "skipped")}


async def test_a_confirmation_waiting_for_a_retry_does_not_follow_the_cancellation(
    clinic: Clinic,
) -> None:
    booking = Booking()
    clinic.know(booking)
    patient = booking.email_of("patient")
    clinic.sink.refusals[patient] = ["451 4.3.0 Try again later"]
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await eventually(lambda: _email_retrying(clinic, "appointment-confirmed"), what="a retry")
        await clinic.publish(booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id)
        await clinic.wait_settled()
        clinic.clock.advance(hours=2)
        await clinic.wait_settled()
    assert len(clinic.sink.to(patient)) == 1  # the cancellation only


async def test_a_reminder_in_flight_when_the_cancel_came_is_not_retried_after_it(
    clinic: Clinic,
) -> None:
    booking = Booking()
    clinic.know(booking)
    patient = booking.email_of("patient")
    release = threading.Event()
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()  # the confirmations went out
        # The reminder's mail is in flight (held at its recipient) when the cancel comes;
        # then the server refuses it for now, so it would be tried again.
        clinic.sink.holds[patient] = (release, "451 4.3.0 Try again later")
        clinic.clock.now = DAY_BEFORE
        try:
            await eventually(lambda: _true(patient in clinic.sink.holding), what="the send")
            await clinic.publish(
                booking.cancelled(clinic.clock(), booking.patient), booking.clinic_id
            )
            await eventually(lambda: _has_kind(clinic, "appointment-cancelled"), what="cancel")
        finally:
            release.set()
        # Generous: under a loaded CI machine the refused send and its record take a while.
        try:
            await eventually(lambda: _email_retrying(clinic, "reminder-24h"), 30, what="the retry")
        except BaseException:
            rows = [
                (d["kind"], d["channel"], d["status"], d["attempts"], d["last_error"])
                for d in await clinic.deliveries()
            ]
            print("deliveries:", rows, "held:", clinic.sink.holding)
            raise
        clinic.clock.advance(hours=2)  # well past the retry's time
        await clinic.wait_settled()
    subjects = [m["Subject"] for m in clinic.sink.to(patient)]
    assert subjects == ["Visit confirmed", "Visit cancelled"], subjects
    (reminder,) = [
        d
        for d in await clinic.deliveries()
        if d["kind"] == "reminder-24h" and d["channel"] == "email"
    ]
    assert (reminder["status"], reminder["last_error"]) == ("skipped", "after AppointmentCancelled")


async def test_a_reminder_whose_worker_died_is_not_resent_after_the_start(clinic: Clinic) -> None:
    booking = Booking()
    clinic.know(booking)
    async with clinic.running():
        await clinic.publish(booking.scheduled(clinic.clock()), booking.clinic_id)
        await clinic.wait_settled()
    # The window opened and a worker claimed the visit-ready push, then died before
    # publishing it: the rows a fired timer and a claim leave, and nothing on the stream.
    clinic.clock.now = WINDOW_OPENS
    ready_id = uuid.uuid4()
    async with clinic.db.acquire() as conn, conn.transaction():
        await conn.execute(
            "DELETE FROM notification_timers WHERE appointment_id = $1 AND kind = 'visit-ready'",
            booking.appointment_id,
        )
        await conn.execute(
            """INSERT INTO notifications (notification_id, kind, recipient_id, recipient_role,
                   appointment_id, clinic_id, cause_event_id, title, body, created_at)
               VALUES ($1, 'visit-ready', $2, 'patient', $3, $4, $5, 'Your visit can start now',
                       'Your visit can start now.', $6)""",
            ready_id,
            booking.patient_id,
            booking.appointment_id,
            booking.clinic_id,
            uuid.uuid4(),
            clinic.clock(),
        )
        await conn.execute(
            """INSERT INTO notification_deliveries (notification_id, channel, status, attempts,
                   next_attempt_at, claimed_at)
               VALUES ($1, 'push', 'sending', 1, $2::timestamptz + interval '30 seconds', $2)""",
            ready_id,
            clinic.clock(),
        )
    async with clinic.running():
        await clinic.publish(booking.started(clinic.clock()), booking.clinic_id)
        await eventually(lambda: _status_is(clinic, "started"), what="the start applied")
        clinic.clock.advance(seconds=31)  # the dead worker's lease runs out
        await clinic.wait_settled()
    assert "visit-ready" not in [p.kind for p in await clinic.pushes()]
    ready = await clinic.db.fetchrow(
        "SELECT status, last_error FROM notification_deliveries WHERE notification_id = $1",
        ready_id,
    )
    assert ready is not None
    # Its worker may be stalled rather than dead, and publish it yet: not resent, recorded
    # in doubt (which holds any later notification of the visit for the lease).
    assert (ready["status"], ready["last_error"]) == ("failed", ABANDONED_IN_DOUBT)


async def _status_is(clinic: Clinic, status: str) -> bool:
    return await clinic.db.fetchval("SELECT status FROM notification_appointments") == status


async def _has_kind(clinic: Clinic, kind: str) -> bool:
    return any(d["kind"] == kind for d in await clinic.deliveries())


async def _true(value: bool) -> bool:
    return value


async def _email_retrying(clinic: Clinic, kind: str) -> bool:
    return any(
        d["kind"] == kind
        and d["channel"] == "email"
        and d["status"] == "pending"
        and d["attempts"] >= 1
        for d in await clinic.deliveries()
    )


async def test_a_reminder_whose_message_cannot_be_written_does_not_hold_back_the_others(
    clinic: Clinic,
) -> None:
    first_start = clinic.clock()
    async with clinic.running():
        await clinic.wait_settled()
        # Down for three days: a booking made meanwhile, its visit begun, arrives now (owed
        # no confirmation, so nothing writes its message until its visit-ready timer fires),
        # with a time zone this host does not know.
        clinic.clock.now = first_start + timedelta(days=3, hours=5, minutes=5)
        unknown = Booking(
            starts_at=clinic.clock() - timedelta(minutes=5), timezone="Mars/Olympus_Mons"
        )
        await clinic.publish(unknown.scheduled(first_start + timedelta(hours=1)), unknown.clinic_id)
        good = Booking(starts_at=clinic.clock() + timedelta(minutes=10))
        clinic.know(good)
        await clinic.publish(good.scheduled(clinic.clock()), good.clinic_id)

        async def ready() -> bool:
            return any(
                p.kind == "visit-ready" and p.appointment_id == good.appointment_id
                for p in await clinic.pushes()
            )

        await eventually(ready, within=15, what="the good visit's visit-ready")
        await _scheduler_ran(clinic)
    assert await _timers(clinic) == 0  # the unwritable one dropped, not retried forever
