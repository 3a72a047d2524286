"""What the service answers: the appointment, visits, history."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

import msgspec

from contracts.common import Actor, AwareDatetime
from contracts.events import EventEnvelope

AppointmentStatus = Literal["scheduled", "cancelled", "started"]
VisitStatus = Literal["scheduled", "started", "completed", "missed", "cancelled"]


class AppointmentView(msgspec.Struct, frozen=True, kw_only=True):
    """The appointment, as commands and ``GET /v1/appointments/{id}`` answer it."""

    appointment_id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    duration_minutes: int
    timezone: str
    visit_reason: str | None
    status: AppointmentStatus
    version: int
    cancelled_at: AwareDatetime | None
    cancelled_by: Actor | None
    cancellation_reason: str | None
    started_at: AwareDatetime | None
    can_cancel: bool
    can_start: bool
    start_window_opens_at: AwareDatetime


class VisitView(msgspec.Struct, frozen=True, kw_only=True):
    """One visit as the patient's app lists it."""

    appointment_id: UUID
    clinic_id: UUID
    patient_id: UUID
    provider_id: UUID
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    timezone: str
    visit_reason: str | None
    status: VisitStatus
    can_cancel: bool
    can_start: bool
    start_window_opens_at: AwareDatetime


class VisitsPage(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/visits``."""

    items: list[VisitView]
    next_cursor: str | None


class History(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/appointments/{id}/history``: the appointment's events in order."""

    events: list[EventEnvelope]
