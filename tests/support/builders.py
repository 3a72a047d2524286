"""Builders of principals, requests and events with sensible defaults."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

from contracts.commands import ScheduleBody
from contracts.common import Principal, Role
from contracts.notifications import Notification
from services.notifications.domain import PlannedNotification


def principal(role: Role = "staff", clinic_id: uuid.UUID | None = None) -> Principal:
    return Principal(id=uuid.uuid4(), role=role, clinic_id=clinic_id or uuid.uuid4())


def schedule_body(
    now: datetime,
    *,
    patient_id: uuid.UUID | None = None,
    provider_id: uuid.UUID | None = None,
    starts_in: timedelta = timedelta(hours=2),
    duration_minutes: int = 30,
    appointment_id: uuid.UUID | None = None,
    timezone: str = "Europe/Berlin",
    visit_reason: str | None = None,
) -> ScheduleBody:
    return ScheduleBody(
        appointment_id=appointment_id,
        patient_id=patient_id or uuid.uuid4(),
        provider_id=provider_id or uuid.uuid4(),
        starts_at=now + starts_in,
        duration_minutes=duration_minutes,
        timezone=timezone,
        visit_reason=visit_reason,
    )


def schedule_json(
    patient_id: uuid.UUID, starts_at: datetime, timezone: str = "Europe/Paris"
) -> dict[str, str | int]:
    """The JSON body of ``POST /v1/appointments``: 30 minutes with a new provider."""
    return {
        "patient_id": str(patient_id),
        "provider_id": str(uuid.uuid4()),
        "starts_at": starts_at.isoformat(),
        "duration_minutes": 30,
        "timezone": timezone,
    }


#: (title, body) of the kinds the tests send.
_WORDING: dict[str, tuple[str, str]] = {
    "appointment-confirmed": ("Visit confirmed", "Your video visit is booked."),
    "visit-ready": ("Your visit can start now", "Your video visit can start now."),
}


def planned_notification(
    kind: Literal["appointment-confirmed", "visit-ready"] = "appointment-confirmed",
) -> PlannedNotification:
    """A notification to a patient, decided on, not sent yet, every id new."""
    title, body = _WORDING[kind]
    return PlannedNotification(
        notification_id=uuid.uuid4(),
        kind=kind,
        recipient_id=uuid.uuid4(),
        recipient_role="patient",
        appointment_id=uuid.uuid4(),
        clinic_id=uuid.uuid4(),
        cause_event_id=uuid.uuid4(),
        title=title,
        body=body,
    )


def notification(sent_at: datetime | None = None) -> Notification:
    """A patient's confirmation of a new booking, every id new, as sent."""
    return planned_notification().sent(sent_at or datetime(2030, 1, 12, 9, 0, tzinfo=UTC))
