"""Notifications as published on ``notifications.v1.sent.<kind>``, and the directory's reply."""

from __future__ import annotations

from typing import Final, Literal
from uuid import UUID

import msgspec

from contracts.common import AwareDatetime, Role

NotificationKind = Literal[
    "appointment-confirmed", "appointment-cancelled", "reminder-24h", "visit-ready"
]
NOTIFICATION_KINDS: Final[tuple[NotificationKind, ...]] = (
    "appointment-confirmed",
    "appointment-cancelled",
    "reminder-24h",
    "visit-ready",
)


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """One notification sent to one person (the mobile gateway's push source)."""

    notification_id: UUID
    kind: NotificationKind
    recipient_id: UUID
    recipient_role: Role
    appointment_id: UUID
    clinic_id: UUID
    cause_event_id: UUID
    title: str
    body: str
    sent_at: AwareDatetime


#: The header of a contact request naming the clinic the notification is of: a directory
#: that knows who belongs where answers no address for a user not of that clinic.
CLINIC_ID_HEADER: Final = "Clinic-Id"


class DirectoryContactReply(msgspec.Struct, frozen=True, kw_only=True):
    """The clinic directory's answer on ``directory.v1.contact.<user_id>``."""

    email: str | None = None
    locale: str | None = None
