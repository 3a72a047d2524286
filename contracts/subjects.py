"""NATS stream names and subjects: the only place they are spelled."""

from __future__ import annotations

from typing import Final
from uuid import UUID

EVENTS_STREAM: Final = "APPOINTMENTS"
EVENTS_SUBJECTS: Final = "appointments.v1.events.>"
EVENTS_PREFIX: Final = "appointments.v1.events"

SERVICE_NAME: Final = "appointments"
CMD_SCHEDULE: Final = "appointments.v1.cmd.schedule"
CMD_CANCEL: Final = "appointments.v1.cmd.cancel"
CMD_START: Final = "appointments.v1.cmd.start"
QUERY_GET: Final = "appointments.v1.query.get"
QUERY_VISITS: Final = "appointments.v1.query.visits"

NOTIFICATIONS_STREAM: Final = "NOTIFICATIONS"
NOTIFICATIONS_SUBJECTS: Final = "notifications.v1.sent.>"
NOTIFICATIONS_PREFIX: Final = "notifications.v1.sent"

DIRECTORY_CONTACT_PREFIX: Final = "directory.v1.contact"


def event_subject(clinic_id: UUID, appointment_id: UUID, kind: str) -> str:
    """``appointments.v1.events.<clinic_id>.<appointment_id>.<kind>``."""
    return f"{EVENTS_PREFIX}.{clinic_id}.{appointment_id}.{kind}"


def event_subject_appointment(subject: str) -> str | None:
    """The ``<appointment_id>`` token of an :func:`event_subject`; None for a subject of
    another shape."""
    tokens = subject.split(".")
    return tokens[4] if len(tokens) == 6 else None


def notification_subject(kind: str) -> str:
    """``notifications.v1.sent.<kind>``."""
    return f"{NOTIFICATIONS_PREFIX}.{kind}"


def directory_contact_subject(user_id: UUID) -> str:
    """``directory.v1.contact.<user_id>``."""
    return f"{DIRECTORY_CONTACT_PREFIX}.{user_id}"
