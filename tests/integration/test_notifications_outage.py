"""The notification service down for days: the bookings made meanwhile are news it owes
(confirmed when it is back, while their visit is still to come), unlike the history a
first start inherits; which is which is told by its first start, recorded once per
database."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from importlib import resources

import asyncpg
import pytest

from services.notifications.store import NotificationStore
from tests.integration.test_notifications_harness import (
    Booking,
    Clinic,
    clinic,
    eventually,
    smtp,
)

__all__ = ["clinic", "smtp"]  # fixtures

pytestmark = pytest.mark.fault


async def _first_start(db: asyncpg.Pool) -> datetime | None:
    started: datetime | None = await db.fetchval("SELECT started_at FROM notification_first_start")
    return started


async def _run_once(clinic: Clinic) -> datetime:
    """Start the service and stop it once it has recorded its start; return that start."""
    async with clinic.running():
        await eventually(lambda: _recorded(clinic), what="the first start to be recorded")
        await clinic.wait_settled()
    started = await _first_start(clinic.db)
    assert started is not None
    return started


async def _recorded(clinic: Clinic) -> bool:
    return await _first_start(clinic.db) is not None


async def _sent(clinic: Clinic, booking: Booking) -> list[tuple[str, str]]:
    """(kind, role) of the pushes about ``booking``."""
    pushes = await clinic.pushes()
    return sorted(
        (p.kind, p.recipient_role) for p in pushes if p.appointment_id == booking.appointment_id
    )


CONFIRMED = [("appointment-confirmed", "patient"), ("appointment-confirmed", "provider")]


async def test_a_booking_made_while_the_service_was_down_for_days_is_confirmed_on_its_return(
    clinic: Clinic,
) -> None:
    earlier = Booking()
    clinic.know(earlier)
    async with clinic.running():
        await clinic.publish(earlier.scheduled(clinic.clock()), earlier.clinic_id)
        await clinic.wait_settled()
    first_start = await _first_start(clinic.db)
    assert first_start == clinic.clock()
    # Down for three days; in the first hour a visit two weeks ahead was booked.
    booking = Booking(starts_at=clinic.clock() + timedelta(days=14))
    clinic.know(booking)
    await clinic.publish(booking.scheduled(clinic.clock() + timedelta(hours=1)), booking.clinic_id)
    clinic.clock.advance(days=3)
    async with clinic.running():
        await eventually(lambda: _has_sent(clinic, booking, 2), what="the confirmations")
        await clinic.wait_settled()
    assert await _sent(clinic, booking) == CONFIRMED
    assert len(clinic.sink.to(booking.email_of("patient"))) == 1
    assert len(clinic.sink.to(booking.email_of("provider"))) == 1
    assert await _first_start(clinic.db) == first_start  # a restart never moves it


async def test_after_a_first_start_on_an_empty_stream_an_outage_owes_its_news_in_order(
    clinic: Clinic,
) -> None:
    """Recorded as it starts, not at its first event: a service that first started with
    nothing to read, then was down for days, owes what was booked meanwhile; a visit booked
    and cancelled meanwhile hears of both, the confirmation first, on each channel."""
    first_start = await _run_once(clinic)
    kept, dropped = (Booking(starts_at=clinic.clock() + timedelta(days=14)) for _ in range(2))
    for booking in (kept, dropped):
        clinic.know(booking)
        await clinic.publish(booking.scheduled(first_start), booking.clinic_id)
    cancelled = dropped.cancelled(first_start + timedelta(hours=2), dropped.patient)
    await clinic.publish(cancelled, dropped.clinic_id)
    clinic.clock.advance(days=3)
    async with clinic.running():
        await eventually(lambda: _has_sent(clinic, dropped, 4), what="the news of the outage")
        await clinic.wait_settled()
    assert await _sent(clinic, kept) == CONFIRMED
    pushes = [p for p in await clinic.pushes() if p.appointment_id == dropped.appointment_id]
    for role in ("patient", "provider"):
        told = [p.kind for p in pushes if p.recipient_role == role]
        assert told == ["appointment-confirmed", "appointment-cancelled"]
        mails = [m["Subject"] for m in clinic.sink.to(dropped.email_of(role))]
        assert len(mails) == 2 and mails[1] == "Visit cancelled"


@pytest.mark.parametrize("applied_after_start", [timedelta(minutes=10), timedelta(days=2)])
async def test_a_booking_applied_after_its_visit_began_is_not_confirmed(
    clinic: Clinic, caplog: pytest.LogCaptureFixture, applied_after_start: timedelta
) -> None:
    caplog.set_level(logging.INFO, logger="services.notifications.handlers")
    await _run_once(clinic)
    # Down for days; in the first hour a visit two days ahead was booked.
    booking = Booking(starts_at=clinic.clock() + timedelta(days=2))
    clinic.know(booking)
    await clinic.publish(booking.scheduled(clinic.clock() + timedelta(hours=1)), booking.clinic_id)
    clinic.clock.now = booking.starts_at + applied_after_start
    async with clinic.running():
        await clinic.wait_settled()
        await eventually(lambda: _timers_left(clinic, 0), what="the reminders to fire or expire")
        await clinic.wait_settled()
    assert "booking applied after its visit began: not confirmed" in caplog.text
    # Its reminders keep their own rule: "your visit can start now" while it can.
    ongoing = applied_after_start < timedelta(minutes=booking.duration_minutes)
    assert await _sent(clinic, booking) == ([("visit-ready", "patient")] if ongoing else [])


async def test_a_first_start_on_a_history_confirms_only_what_was_booked_in_its_last_day(
    clinic: Clinic,
) -> None:
    old, recent = Booking(), Booking()
    for booking in (old, recent):
        booking.starts_at = clinic.clock() + timedelta(days=14)
        clinic.know(booking)
    await clinic.publish(old.scheduled(clinic.clock()), old.clinic_id)
    clinic.clock.advance(days=3)
    await clinic.publish(recent.scheduled(clinic.clock() - timedelta(hours=20)), recent.clinic_id)
    assert await _first_start(clinic.db) is None  # a new database: this is its first start
    started = await _run_once(clinic)
    assert started == clinic.clock()
    assert await _sent(clinic, old) == []
    assert await _sent(clinic, recent) == CONFIRMED


async def test_processes_starting_at_once_record_one_first_start(clinic: Clinic) -> None:
    store = NotificationStore(clinic.db)
    base = clinic.clock()
    starts = await asyncio.gather(
        *(store.record_first_start(base + timedelta(seconds=i)) for i in range(8))
    )
    assert len(set(starts)) == 1 and starts[0] in {base + timedelta(seconds=i) for i in range(8)}
    assert await store.record_first_start(base + timedelta(days=3)) == starts[0]
    assert await clinic.db.fetchval("SELECT count(*) FROM notification_first_start") == 1


async def test_a_database_used_before_the_first_start_was_recorded_starts_at_its_first_event(
    clinic: Clinic,
) -> None:
    """The migration that adds the record dates an existing database's first start from
    the first event it applied: an outage spanning the upgrade is owed its bookings too."""
    first = datetime.fromisoformat("2030-01-02T08:00:00+00:00")
    await clinic.db.execute("DROP TABLE notification_first_start")  # as before 0007
    await clinic.db.executemany(
        """INSERT INTO notification_processed_events
               (event_id, appointment_id, stream_sequence, processed_at)
           VALUES (gen_random_uuid(), gen_random_uuid(), $1, $2)""",
        [(1, first), (2, first + timedelta(days=1))],
    )
    await clinic.db.execute(_migration("0007_notification_first_start.sql"))
    assert await _first_start(clinic.db) == first


def _migration(name: str) -> str:
    folder = resources.files("services.appointments.adapters.postgres.migrations")
    return folder.joinpath(name).read_text(encoding="utf-8")


async def _has_sent(clinic: Clinic, booking: Booking, count: int) -> bool:
    return len(await _sent(clinic, booking)) >= count


async def _timers_left(clinic: Clinic, count: int) -> bool:
    left: int = await clinic.db.fetchval("SELECT count(*) FROM notification_timers")
    return left == count
