"""The appointment representation computed from its state at read time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import assert_never
from uuid import UUID

from contracts.views import AppointmentStatus, AppointmentView
from services.appointments.domain.rules import (
    Rules,
    can_cancel,
    can_start,
    start_window_opens_at,
)
from services.appointments.domain.state import Cancelled, NotScheduled, Scheduled, Started, State


def status_of(state: Scheduled | Cancelled | Started) -> AppointmentStatus:
    match state:
        case Scheduled():
            return "scheduled"
        case Cancelled():
            return "cancelled"
        case Started():
            return "started"
        case _:
            assert_never(state)


def appointment_view(
    appointment_id: UUID, state: State, version: int, now: datetime, rules: Rules
) -> AppointmentView:
    """The appointment as answered to commands and GET, with the flags valid at ``now``."""
    if isinstance(state, NotScheduled):
        raise ValueError("an unscheduled appointment has no view")
    booking = state.booking
    status = status_of(state)
    starts_at = booking.starts_at.astimezone(UTC)
    ends = booking.ends_at.astimezone(UTC)
    return AppointmentView(
        appointment_id=appointment_id,
        clinic_id=booking.clinic_id,
        patient_id=booking.patient_id,
        provider_id=booking.provider_id,
        starts_at=starts_at,
        ends_at=ends,
        duration_minutes=booking.duration_minutes,
        timezone=booking.timezone,
        visit_reason=booking.visit_reason,
        status=status,
        version=version,
        cancelled_at=state.cancelled_at.astimezone(UTC) if isinstance(state, Cancelled) else None,
        cancelled_by=state.cancelled_by if isinstance(state, Cancelled) else None,
        cancellation_reason=state.reason if isinstance(state, Cancelled) else None,
        started_at=state.started_at.astimezone(UTC) if isinstance(state, Started) else None,
        can_cancel=can_cancel(status, ends, now),
        can_start=can_start(status, starts_at, ends, now, rules),
        start_window_opens_at=start_window_opens_at(starts_at, rules),
    )
