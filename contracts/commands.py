"""Command and query requests: HTTP bodies, and the NATS requests built on them.

A NATS request is the HTTP body plus ``appointment_id`` where the HTTP path had it, plus the
``actor`` (callers are trusted through their NATS credentials).
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

import msgspec

from contracts.common import AwareDatetime, FreeText, Principal

MIN_DURATION_MINUTES = 5
MAX_DURATION_MINUTES = 240
DurationMinutes = Annotated[int, msgspec.Meta(ge=MIN_DURATION_MINUTES, le=MAX_DURATION_MINUTES)]
TimezoneName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
VisitsTab = Literal["upcoming", "past"]
PageLimit = Annotated[int, msgspec.Meta(ge=1, le=100)]
#: As HTTP ``If-Match`` takes it: at most 9 digits.
Version = Annotated[int, msgspec.Meta(ge=0, le=999_999_999)]
#: As HTTP ``Idempotency-Key`` takes it (U+0000 is refused too).
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
#: As HTTP's ``cursor`` query parameter and ``X-Consistency-Token`` header take them (a
#: token, or up to 16 separated by commas).
Cursor = Annotated[str, msgspec.Meta(max_length=200)]
ConsistencyToken = Annotated[str, msgspec.Meta(max_length=1000)]


class ScheduleBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/appointments``."""

    appointment_id: UUID | None = None
    """Client-chosen id, so that a retry cannot book twice."""
    patient_id: UUID
    provider_id: UUID
    starts_at: AwareDatetime
    duration_minutes: DurationMinutes
    timezone: TimezoneName
    """IANA zone of the patient, for display and messages."""
    visit_reason: FreeText | None = None


class CancelBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/appointments/{id}/cancel`` (the body is optional)."""

    reason: FreeText | None = None


class ScheduleRequest(ScheduleBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``appointments.v1.cmd.schedule``."""

    actor: Principal
    idempotency_key: IdempotencyKey | None = None


class CancelRequest(CancelBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``appointments.v1.cmd.cancel``."""

    appointment_id: UUID
    actor: Principal
    expected_version: Version | None = None
    """Like HTTP ``If-Match``: refuse with ``version-conflict`` when the version differs."""
    idempotency_key: IdempotencyKey | None = None


class StartRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``appointments.v1.cmd.start``."""

    appointment_id: UUID
    actor: Principal
    expected_version: Version | None = None
    idempotency_key: IdempotencyKey | None = None


class GetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``appointments.v1.query.get``."""

    appointment_id: UUID
    actor: Principal


class VisitsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``appointments.v1.query.visits``."""

    actor: Principal
    tab: VisitsTab = "upcoming"
    limit: PageLimit = 20
    cursor: Cursor | None = None
    consistency_token: ConsistencyToken | None = None
