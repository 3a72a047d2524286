"""The notification service's event handler on a hand-written store: what an event
records, which notifications it plans, and what it leaves for later."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

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

    async def mark_processed(self, event_id: UUID, appointment_id: UUID, sequence: int) -> bool:
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

    async def skip_outdated(self, appointment_id: UUID, why: str) -> None:
        self.skipped.append(appointment_id)


class FakeStore:
    def __init__(self) -> None:
        self.tx = FakeTransaction()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[FakeTransaction]:
        yield self.tx


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


def booking() -> AppointmentScheduled:
    patient = uuid.uuid4()
    return AppointmentScheduled(
        clinic_id=uuid.uuid4(),
        patient_id=patient,
        provider_id=uuid.uuid4(),
        starts_at=STARTS_AT,
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
