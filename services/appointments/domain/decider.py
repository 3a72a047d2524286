"""decide(state, command, now, rules) -> events, or a :class:`ClinicError`.

Pure: time comes in as ``now``, ids come in with the command.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import assert_never
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from contracts.commands import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES
from contracts.common import MAX_TEXT_LENGTH, Principal
from contracts.events import AppointmentCancelled, AppointmentScheduled, AppointmentStarted, Event
from services.appointments.domain.commands import (
    CancelAppointment,
    Command,
    ScheduleAppointment,
    StartAppointment,
)
from services.appointments.domain.rules import (
    MAX_BOOKING_HORIZON,
    Rules,
    start_window_opens_at,
)
from services.appointments.domain.state import (
    Booking,
    Cancelled,
    NotScheduled,
    Scheduled,
    Started,
    State,
    booking_of,
)
from services.errors import (
    AlreadyExists,
    AppointmentAlreadyStarted,
    AppointmentIsCancelled,
    AppointmentPast,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooEarly,
)

DEFAULT_RULES = Rules()
#: Text with U+0000 is refused: PostgreSQL (and many consumers) cannot hold it.
NUL_REFUSED = "{name} must not contain the character U+0000."


def decide(
    state: State, command: Command, now: datetime, rules: Rules = DEFAULT_RULES
) -> list[Event]:
    """The events ``command`` produces in ``state`` at ``now`` (empty: nothing to change)."""
    match command:
        case ScheduleAppointment():
            return _schedule(state, command, now)
        case CancelAppointment():
            return _cancel(state, command, now)
        case StartAppointment():
            return _start(state, command, now, rules)
        case _:
            assert_never(command)


def may_see(actor: Principal, booking: Booking) -> bool:
    """Whether ``actor`` may see (and so cancel or start) the appointment."""
    if actor.clinic_id != booking.clinic_id:
        return False
    match actor.role:
        case "staff":
            return True
        case "patient":
            return actor.id == booking.patient_id
        case "provider":
            return actor.id == booking.provider_id
        case _:
            assert_never(actor.role)


def visible_booking(state: State, actor: Principal) -> Booking:
    """The booking, or ``not-found`` when it does not exist or the actor may not see it."""
    booking = booking_of(state)
    if booking is None or not may_see(actor, booking):
        raise NotFound("No such appointment.")
    return booking


def _validate_schedule(command: ScheduleAppointment, now: datetime) -> None:
    starts_at = command.starts_at
    if starts_at.tzinfo is None or starts_at.utcoffset() is None:
        raise InvalidRequest("starts_at must carry a UTC offset.")
    if starts_at <= now:
        raise InvalidRequest("starts_at must be in the future.")
    if starts_at - now > MAX_BOOKING_HORIZON:
        raise InvalidRequest("starts_at must be at most 365 days ahead.")
    if not MIN_DURATION_MINUTES <= command.duration_minutes <= MAX_DURATION_MINUTES:
        raise InvalidRequest(
            f"duration_minutes must be between {MIN_DURATION_MINUTES} and {MAX_DURATION_MINUTES}."
        )
    if command.visit_reason is not None and len(command.visit_reason) > MAX_TEXT_LENGTH:
        raise InvalidRequest(f"visit_reason must be at most {MAX_TEXT_LENGTH} characters.")
    if command.visit_reason is not None and "\x00" in command.visit_reason:
        raise InvalidRequest(NUL_REFUSED.format(name="visit_reason"))
    if not is_valid_timezone(command.timezone):
        raise InvalidRequest(f"timezone {command.timezone!r} is not a known IANA time zone.")


@functools.cache
def _zone_names() -> frozenset[str]:
    """The zones of this machine's tz database. ``available_timezones`` leaves out the
    ``posix/`` and ``right/`` copies and ``posixrules``, which ``ZoneInfo`` would open;
    ``localtime`` is the host's own zone, whatever it is, under a name of its own;
    ``Factory`` is the database's placeholder for "no zone set yet" (its time is UTC,
    its abbreviation ``-00``): no place, and a meaningless time in a message."""
    return frozenset(available_timezones() - {"localtime", "Factory"})


def is_valid_timezone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone this machine knows."""
    if name not in _zone_names():
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _authorize_schedule(command: ScheduleAppointment) -> None:
    actor = command.actor
    match actor.role:
        case "patient" if command.patient_id != actor.id:
            raise Forbidden("A patient can only book appointments for themselves.")
        case "provider" if command.provider_id != actor.id:
            raise Forbidden("A provider can only book appointments they hold.")
        case _:
            return


def _schedule(state: State, command: ScheduleAppointment, now: datetime) -> list[Event]:
    _authorize_schedule(command)
    starts_at = command.starts_at
    if starts_at.utcoffset() is not None:
        # Stored in UTC, so that durations are elapsed time even across a DST change.
        try:
            starts_at = starts_at.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00-05:00 has no UTC time
            raise InvalidRequest("starts_at is out of range.") from None
    event = AppointmentScheduled(
        clinic_id=command.actor.clinic_id,
        patient_id=command.patient_id,
        provider_id=command.provider_id,
        starts_at=starts_at,
        duration_minutes=command.duration_minutes,
        timezone=command.timezone,
        visit_reason=command.visit_reason,
        scheduled_by=command.actor.actor,
    )
    booking = booking_of(state)
    if booking is not None:
        if _is_retry_of(booking, event):
            return []
        raise AlreadyExists("An appointment with this id already exists.")
    _validate_schedule(command, now)
    return [event]


def _is_retry_of(booking: Booking, event: AppointmentScheduled) -> bool:
    return (
        booking.clinic_id == event.clinic_id
        and booking.patient_id == event.patient_id
        and booking.provider_id == event.provider_id
        and booking.starts_at == event.starts_at
        and booking.duration_minutes == event.duration_minutes
        and booking.timezone == event.timezone
        and booking.visit_reason == event.visit_reason
        and booking.scheduled_by == event.scheduled_by
    )


def _cancel(state: State, command: CancelAppointment, now: datetime) -> list[Event]:
    booking = visible_booking(state, command.actor)
    if command.reason is not None and len(command.reason) > MAX_TEXT_LENGTH:
        raise InvalidRequest(f"reason must be at most {MAX_TEXT_LENGTH} characters.")
    if command.reason is not None and "\x00" in command.reason:
        raise InvalidRequest(NUL_REFUSED.format(name="reason"))
    match state:
        case Cancelled():
            return []
        case Started():
            raise AppointmentAlreadyStarted("A started appointment cannot be cancelled.")
        case Scheduled():
            if now >= booking.ends_at:
                raise AppointmentPast("The appointment is over and can no longer be cancelled.")
            return [
                AppointmentCancelled(
                    clinic_id=booking.clinic_id,
                    cancelled_by=command.actor.actor,
                    reason=command.reason,
                    cancelled_at=now,
                )
            ]
        case NotScheduled():
            raise NotFound("No such appointment.")
        case _:
            assert_never(state)


def _start(state: State, command: StartAppointment, now: datetime, rules: Rules) -> list[Event]:
    booking = visible_booking(state, command.actor)
    match state:
        case Started():
            if now >= booking.ends_at:  # the visit is over: no rejoining (rules.can_start)
                raise AppointmentPast("The appointment is over and can no longer be started.")
            return []  # the patient rejoins
        case Cancelled():
            raise AppointmentIsCancelled("A cancelled appointment cannot be started.")
        case Scheduled():
            opens_at = start_window_opens_at(booking.starts_at, rules)
            if now < opens_at:
                raise TooEarly(
                    f"The visit can be started from {opens_at.isoformat()}.", opens_at=opens_at
                )
            if now >= booking.ends_at:
                raise AppointmentPast("The appointment is over and can no longer be started.")
            return [
                AppointmentStarted(
                    clinic_id=booking.clinic_id, started_by=command.actor.actor, started_at=now
                )
            ]
        case NotScheduled():
            raise NotFound("No such appointment.")
        case _:
            assert_never(state)
