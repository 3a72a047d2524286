"""Commands the appointment aggregate decides (imperative names)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import msgspec

from contracts.common import Principal


class ScheduleAppointment(msgspec.Struct, frozen=True, kw_only=True):
    appointment_id: UUID
    actor: Principal
    patient_id: UUID
    provider_id: UUID
    starts_at: datetime
    duration_minutes: int
    timezone: str
    visit_reason: str | None = None


class CancelAppointment(msgspec.Struct, frozen=True, kw_only=True):
    appointment_id: UUID
    actor: Principal
    reason: str | None = None


class StartAppointment(msgspec.Struct, frozen=True, kw_only=True):
    appointment_id: UUID
    actor: Principal


Command = ScheduleAppointment | CancelAppointment | StartAppointment
