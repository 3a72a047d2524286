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
    decided: ClassVar[bool] = False
    """A refusal decided on what the appointment is (a 409 or 412), not on what the request
    is or whether it could run: an answer a retry under the same idempotency key gets too."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def to_problem(self) -> Problem:
        return problem(self.code, self.detail)

    @classmethod
    def from_problem(cls, doc: Problem) -> ClinicError:
        """The error again, from the problem document :meth:`to_problem` made of it."""
        return cls(doc.detail)


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
    decided = True


class AlreadyExists(ClinicError):
    code = ErrorCode.ALREADY_EXISTS
    decided = True


class AppointmentAlreadyStarted(ClinicError):
    code = ErrorCode.APPOINTMENT_STARTED
    decided = True


class AppointmentPast(ClinicError):
    code = ErrorCode.APPOINTMENT_PAST
    decided = True


class AppointmentIsCancelled(ClinicError):
    code = ErrorCode.APPOINTMENT_CANCELLED
    decided = True


class TooEarly(ClinicError):
    code = ErrorCode.TOO_EARLY
    decided = True

    def __init__(self, detail: str, opens_at: datetime) -> None:
        super().__init__(detail)
        self.opens_at = opens_at

    def to_problem(self) -> Problem:
        return problem(self.code, self.detail, opens_at=self.opens_at)

    @classmethod
    def from_problem(cls, doc: Problem) -> ClinicError:
        """The error again, from the problem document :meth:`to_problem` made of it."""
        if doc.opens_at is None:
            raise ValueError("a too-early problem says when the start window opens")
        return cls(doc.detail, doc.opens_at)


class VersionConflict(ClinicError):
    code = ErrorCode.VERSION_CONFLICT
    decided = True


class PayloadTooLarge(ClinicError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class IdempotencyKeyReused(ClinicError):
    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


class Unavailable(ClinicError):
    code = ErrorCode.UNAVAILABLE

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


_BY_CODE: dict[ErrorCode, type[ClinicError]] = {
    error.code: error for error in ClinicError.__subclasses__()
}


def error_of(doc: Problem) -> ClinicError:
    """The error whose problem document ``doc`` is (a refusal kept under an idempotency key,
    raised again for a retry)."""
    return _BY_CODE[doc.code].from_problem(doc)
