"""The notification service's event handler on a hand-written store: what an event
records, which notifications it plans, and what it leaves for later."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec

from contracts.common import Actor
from contracts.events import (
    SCHEMA_VERSIONS,
    AppointmentCancelled,
    AppointmentScheduled,
    EventEnvelope,
    event_data,
    event_type,
)
from services.appointments.domain.rules import Rules
from services.notifications.domain import Appointment, PlannedNotification, Timer
from services.notifications.handlers import EventHandler, Outcome
from services.notifications.runtime import Tuning

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)
STARTS_AT = NOW + timedelta(days=3)


class FakeTransaction:
    """The store's state, changed in place (one transaction at a time)."""

    def __init__(self) -> None:
        self.processed: set[UUID] = set()
        self.appointments: dict[UUID, Appointment] = {}
        self.timers: dict[UUID, list[Timer]] = {}
        self.notifications: list[PlannedNotification] = []
        self.skipped: list[UUID] = []
        self.started_at: datetime | None = None

    async def mark_processed(
        self, event_id: UUID, appointment_id: UUID, sequence: int, at: datetime
    ) -> bool:
        if event_id in self.processed:
            return False
        self.processed.add(event_id)
        return True

    async def locked_appointment(self, appointment_id: UUID) -> Appointment | None:
        return self.appointments.get(appointment_id)

    async def add_appointment(self, a: Appointment) -> None:
        self.appointments[a.appointment_id] = a

    async def set_status(self, appointment_id: UUID, status: Any) -> None:
        a = self.appointments[appointment_id]
        self.appointments[appointment_id] = Appointment(
            **{**{f: getattr(a, f) for f in a.__struct_fields__}, "status": status}
        )

    async def add_notifications(
        self, planned: Sequence[PlannedNotification], channels: Any, now: datetime
    ) -> None:
        self.notifications.extend(planned)

    async def first_start(self) -> datetime | None:
        return self.started_at

    async def was_confirmed(self, appointment_id: UUID) -> bool:
        return any(
            n.kind == "appointment-confirmed" and n.appointment_id == appointment_id
            for n in self.notifications
        )

    async def set_timers(self, timers: Sequence[Timer]) -> None:
        for timer in timers:
            self.timers.setdefault(timer.appointment_id, []).append(timer)

    async def drop_timers(self, appointment_id: UUID) -> None:
        self.timers.pop(appointment_id, None)

    async def skip_outdated(self, appointment_id: UUID, why: str, now: datetime) -> None:
        self.skipped.append(appointment_id)


class FakeStore:
    def __init__(self) -> None:
        self.tx = FakeTransaction()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        yield self.tx

    async def record_first_start(self, now: datetime) -> datetime:
        if self.tx.started_at is None:
            self.tx.started_at = now
        return self.tx.started_at


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def envelope(stream: UUID, version: int, event: Any, at: datetime = NOW) -> EventEnvelope:
    type_ = event_type(event)
    return EventEnvelope(
        event_id=uuid.uuid4(),
        type=type_,
        schema_version=SCHEMA_VERSIONS[type_],
        stream_id=stream,
        stream_version=version,
        global_position=version,
        occurred_at=at,
        correlation_id=None,
        causation_id=None,
        data=event_data(event),
    )


def setup() -> tuple[EventHandler, FakeTransaction, Clock]:
    store, clock = FakeStore(), Clock()
    handler = EventHandler(store, clock, Rules(), [], Tuning())  # type: ignore[arg-type]
    return handler, store.tx, clock


def booking(starts_at: datetime = STARTS_AT) -> AppointmentScheduled:
    patient = uuid.uuid4()
    return AppointmentScheduled(
        clinic_id=uuid.uuid4(),
        patient_id=patient,
        provider_id=uuid.uuid4(),
        starts_at=starts_at,
        duration_minutes=30,
        timezone="Europe/Berlin",
        scheduled_by=Actor(id=patient, role="patient"),
    )


def cancellation(by: Actor) -> AppointmentCancelled:
    return AppointmentCancelled(clinic_id=uuid.uuid4(), cancelled_by=by, cancelled_at=NOW)


async def test_a_booking_sets_its_reminders_and_confirms_once() -> None:
    handler, tx, _ = setup()
    stream, event = uuid.uuid4(), booking()
    booked = envelope(stream, 1, event)
    assert await handler.apply(booked, event, 1) is Outcome.APPLIED
    assert [t.kind for t in tx.timers[stream]] == ["reminder-24h", "visit-ready"]
    assert {n.kind for n in tx.notifications} == {"appointment-confirmed"}
    assert await handler.apply(booked, event, 1) is Outcome.DUPLICATE
    assert len(tx.notifications) == 2  # patient and provider, once


async def test_a_cancel_before_its_booking_waits_and_marks_nothing() -> None:
    handler, tx, _ = setup()
    stream, event = uuid.uuid4(), booking()
    cancel = cancellation(Actor(id=event.patient_id, role="patient"))
    early = envelope(stream, 2, cancel)
    assert await handler.apply(early, cancel, 2) is Outcome.NOT_READY
    assert early.event_id not in tx.processed and tx.notifications == []


async def test_a_cancel_drops_the_reminders_and_tells_in_time_only() -> None:
    handler, tx, clock = setup()
    for late in (False, True):
        stream, event = uuid.uuid4(), booking()
        await handler.apply(envelope(stream, 1, event), event, 1)
        before = len(tx.notifications)
        if late:  # the visit's time is over when the cancel is applied
            clock.now = STARTS_AT + timedelta(minutes=30)
        cancel = cancellation(Actor(id=event.provider_id, role="provider"))
        assert await handler.apply(envelope(stream, 2, cancel), cancel, 2) is Outcome.APPLIED
        assert stream not in tx.timers and stream in tx.skipped
        assert tx.appointments[stream].status == "cancelled"
        notices = [n for n in tx.notifications[before:] if n.kind == "appointment-cancelled"]
        assert len(notices) == (0 if late else 1)  # to the patient: the provider cancelled


async def test_the_first_start_is_recorded_once_and_never_moves() -> None:
    handler, tx, clock = setup()
    assert await handler.begin() == NOW
    clock.now = NOW + timedelta(days=3)  # a restart
    assert await handler.begin() == NOW
    assert tx.started_at == NOW


async def _confirmations_of_a_booking_made(
    at: datetime, applied_at: datetime, *, began: bool = False, first_start: bool = True
) -> int:
    """How many confirmations a booking made ``at`` gets, applied at ``applied_at`` by a
    service that first started at ``NOW`` (unless not ``first_start``: no start recorded),
    for a visit that has ``began`` by then or is a week ahead of then."""
    handler, tx, clock = setup()
    if first_start:
        await handler.begin()
    clock.now = applied_at
    starts_at = applied_at - timedelta(minutes=10) if began else applied_at + timedelta(days=7)
    stream, event = uuid.uuid4(), booking(starts_at)
    assert await handler.apply(envelope(stream, 1, event, at), event, 1) is Outcome.APPLIED
    assert [t.kind for t in tx.timers.get(stream, [])]  # its reminders are set either way
    return sum(n.kind == "appointment-confirmed" for n in tx.notifications)


async def test_a_booking_made_since_the_first_start_is_confirmed_however_late() -> None:
    made = NOW + timedelta(hours=1)  # then the service is down for three days
    assert await _confirmations_of_a_booking_made(made, made + timedelta(days=3)) == 2


async def test_a_booking_made_at_the_very_moment_of_the_first_start_is_owed() -> None:
    assert await _confirmations_of_a_booking_made(NOW, NOW + timedelta(days=3)) == 2
    before = NOW - timedelta(microseconds=1)
    assert await _confirmations_of_a_booking_made(before, NOW + timedelta(days=3)) == 0


async def test_a_booking_applied_late_once_its_visit_began_is_not_confirmed() -> None:
    made = NOW + timedelta(hours=1)
    applied = made + timedelta(days=3)
    assert await _confirmations_of_a_booking_made(made, applied, began=True) == 0


async def test_a_booking_older_than_the_first_start_is_confirmed_only_while_fresh() -> None:
    fresh, stale = NOW - timedelta(hours=20), NOW - timedelta(hours=25)
    assert await _confirmations_of_a_booking_made(fresh, NOW) == 2
    assert await _confirmations_of_a_booking_made(stale, NOW) == 0


async def test_a_late_booking_without_a_recorded_start_is_history_not_news() -> None:
    made = NOW + timedelta(hours=1)
    applied = made + timedelta(days=3)
    assert await _confirmations_of_a_booking_made(made, applied, first_start=False) == 0


async def test_a_short_notice_booking_applied_a_little_late_is_still_confirmed() -> None:
    made = NOW + timedelta(hours=1)  # for a visit minutes ahead, applied after its start
    assert await _confirmations_of_a_booking_made(made, made + timedelta(minutes=30), began=True)


async def test_a_booking_and_its_cancel_made_during_an_outage_are_both_told() -> None:
    handler, tx, clock = setup()
    await handler.begin()
    stream, event = uuid.uuid4(), booking(NOW + timedelta(days=7))
    cancel = cancellation(Actor(id=event.patient_id, role="patient"))
    clock.now = NOW + timedelta(days=3)
    booked = envelope(stream, 1, event, NOW + timedelta(hours=1))
    cancelled = envelope(stream, 2, cancel, NOW + timedelta(hours=2))
    assert await handler.apply(booked, event, 1) is Outcome.APPLIED
    assert await handler.apply(cancelled, cancel, 2) is Outcome.APPLIED
    assert sorted(n.kind for n in tx.notifications) == (
        ["appointment-cancelled"] * 2 + ["appointment-confirmed"] * 2
    )


async def test_a_booking_in_a_zone_unknown_here_is_still_confirmed_and_cancelled_in_utc() -> None:
    """The API took the name with its tz database; this process's lacks it (another image)."""
    handler, tx, _ = setup()
    stream = uuid.uuid4()
    event = msgspec.structs.replace(booking(), timezone="Atlantis/Lost_City")
    assert await handler.apply(envelope(stream, 1, event), event, 1) is Outcome.APPLIED
    confirmations = [n for n in tx.notifications if n.kind == "appointment-confirmed"]
    assert len(confirmations) == 2 and all("UTC" in n.body for n in confirmations)
    cancel = cancellation(Actor(id=event.provider_id, role="provider"))
    assert await handler.apply(envelope(stream, 2, cancel), cancel, 2) is Outcome.APPLIED
    assert [n.kind for n in tx.notifications].count("appointment-cancelled") == 1
