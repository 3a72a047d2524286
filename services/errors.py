"""Every error the services report: one base, one subclass per stable code.

HTTP and NATS turn a :class:`ClinicError` into the same problem document; anything else
that escapes is a bug and is answered as ``unavailable`` without leaking details.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from contracts.errors import ErrorCode, Problem, problem


class ClinicError(Exception):
    """Base of all errors with a stable ``code``."""

    code: ClassVar[ErrorCode]

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def to_problem(self) -> Problem:
        return problem(self.code, self.detail)


class InvalidRequest(ClinicError):
    code = ErrorCode.INVALID_REQUEST


class Unauthenticated(ClinicError):
    code = ErrorCode.UNAUTHENTICATED


class Forbidden(ClinicError):
    code = ErrorCode.FORBIDDEN


class NotFound(ClinicError):
    code = ErrorCode.NOT_FOUND


class SlotTaken(ClinicError):
    code = ErrorCode.SLOT_TAKEN


class AlreadyExists(ClinicError):
    code = ErrorCode.ALREADY_EXISTS


class AppointmentStarted(ClinicError):
    code = ErrorCode.APPOINTMENT_STARTED


class AppointmentPast(ClinicError):
    code = ErrorCode.APPOINTMENT_PAST


class AppointmentIsCancelled(ClinicError):
    code = ErrorCode.APPOINTMENT_CANCELLED


class TooEarly(ClinicError):
    code = ErrorCode.TOO_EARLY

    def __init__(self, detail: str, opens_at: datetime) -> None:
        super().__init__(detail)
        self.opens_at = opens_at

    def to_problem(self) -> Problem:
        return problem(self.code, self.detail, opens_at=self.opens_at)


class VersionConflict(ClinicError):
    code = ErrorCode.VERSION_CONFLICT


class PayloadTooLarge(ClinicError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class IdempotencyKeyReused(ClinicError):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class Unavailable(ClinicError):
    code = ErrorCode.UNAVAILABLE

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
