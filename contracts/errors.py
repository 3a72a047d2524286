"""Error codes and the problem document (RFC 9457) shared by HTTP and NATS replies."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Final

import msgspec

from contracts.common import AwareDatetime


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid-request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    SLOT_TAKEN = "slot-taken"
    ALREADY_EXISTS = "already-exists"
    APPOINTMENT_STARTED = "appointment-started"
    APPOINTMENT_PAST = "appointment-past"
    APPOINTMENT_CANCELLED = "appointment-cancelled"
    TOO_EARLY = "too-early"
    VERSION_CONFLICT = "version-conflict"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    IDEMPOTENCY_KEY_REUSED = "idempotency-key-reused"
    UNAVAILABLE = "unavailable"


#: code -> (HTTP status, title)
ERRORS: Final[dict[ErrorCode, tuple[int, str]]] = {
    ErrorCode.INVALID_REQUEST: (400, "The request is not valid"),
    ErrorCode.UNAUTHENTICATED: (401, "Authentication is required"),
    ErrorCode.FORBIDDEN: (403, "This action is not allowed"),
    ErrorCode.NOT_FOUND: (404, "Not found"),
    ErrorCode.SLOT_TAKEN: (409, "The provider is already booked at that time"),
    ErrorCode.ALREADY_EXISTS: (409, "The appointment already exists"),
    ErrorCode.APPOINTMENT_STARTED: (409, "The appointment has already started"),
    ErrorCode.APPOINTMENT_PAST: (409, "The appointment is over"),
    ErrorCode.APPOINTMENT_CANCELLED: (409, "The appointment is cancelled"),
    ErrorCode.TOO_EARLY: (409, "The appointment cannot be started yet"),
    ErrorCode.VERSION_CONFLICT: (412, "The appointment has changed"),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, "The request body is too large"),
    ErrorCode.IDEMPOTENCY_KEY_REUSED: (422, "The idempotency key was used for another request"),
    ErrorCode.UNAVAILABLE: (503, "The service is temporarily unavailable"),
}

PROBLEM_TYPE_BASE: Final = "https://clinic.example/problems/"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error answer: ``application/problem+json`` over HTTP, the reply body over NATS."""

    type: str
    title: str
    status: int
    detail: str
    code: ErrorCode
    opens_at: AwareDatetime | None = None
    """With ``too-early``: when the start window opens."""


def problem(code: ErrorCode, detail: str, *, opens_at: datetime | None = None) -> Problem:
    """Build the problem document of an error code."""
    status, title = ERRORS[code]
    return Problem(
        type=PROBLEM_TYPE_BASE + code.value,
        title=title,
        status=status,
        detail=detail,
        code=code,
        opens_at=opens_at,
    )
