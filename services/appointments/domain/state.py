"""The appointment's state: a small union of frozen Structs, folded from its events."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import assert_never
from uuid import UUID

import msgspec

from contracts.common import Actor
from contracts.events import AppointmentCancelled, AppointmentScheduled, AppointmentStarted, Event


class Booking(msgspec.Struct, frozen=True, kw_only=True):
    """What was booked: fixed once scheduled."""

    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: datetime
    duration_minutes: int
    timezone: str
    visit_reason: str | None
    scheduled_by: Actor

    @property
    def ends_at(self) -> datetime:
        return self.starts_at + timedelta(minutes=self.duration_minutes)


class NotScheduled(msgspec.Struct, frozen=True):
    """No event yet: the appointment does not exist."""


class Scheduled(msgspec.Struct, frozen=True):
    booking: Booking


class Cancelled(msgspec.Struct, frozen=True):
    booking: Booking
    cancelled_by: Actor
    reason: str | None
    cancelled_at: datetime


class Started(msgspec.Struct, frozen=True):
    booking: Booking
    started_by: Actor
    started_at: datetime


State = NotScheduled | Scheduled | Cancelled | Started
INITIAL: State = NotScheduled()


class CorruptStream(Exception):
    """An event that cannot follow the current state: the stored stream is inconsistent."""


def evolve(state: State, event: Event) -> State:
    """Apply one event to the state."""
    match state, event:
        case NotScheduled(), AppointmentScheduled():
            return Scheduled(
                Booking(
                    clinic_id=event.clinic_id,
                    patient_id=event.patient_id,
                    provider_id=event.provider_id,
                    starts_at=event.starts_at,
                    duration_minutes=event.duration_minutes,
                    timezone=event.timezone,
                    visit_reason=event.visit_reason,
                    scheduled_by=event.scheduled_by,
                )
            )
        case Scheduled(booking), AppointmentCancelled():
            return Cancelled(booking, event.cancelled_by, event.reason, event.cancelled_at)
        case Scheduled(booking), AppointmentStarted():
            return Started(booking, event.started_by, event.started_at)
        case _:
            raise CorruptStream(f"{type(event).__name__} cannot follow {type(state).__name__}")


def fold(events: Iterable[Event], state: State = INITIAL) -> State:
    """The state after all ``events``."""
    for event in events:
        state = evolve(state, event)
    return state


def booking_of(state: State) -> Booking | None:
    """The booking of any state but :class:`NotScheduled`."""
    match state:
        case NotScheduled():
            return None
        case Scheduled(booking) | Cancelled(booking) | Started(booking):
            return booking
        case _:
            assert_never(state)
