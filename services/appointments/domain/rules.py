"""Time rules shared by the commands and the read side, so both always agree."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec

from contracts.views import AppointmentStatus, VisitStatus

DEFAULT_START_WINDOW = timedelta(minutes=15)
MAX_BOOKING_HORIZON = timedelta(days=365)


class Rules(msgspec.Struct, frozen=True):
    """Per-deployment settings of the rules."""

    start_window: timedelta = DEFAULT_START_WINDOW
    """How long before ``starts_at`` a visit can be started."""


def ends_at(starts_at: datetime, duration_minutes: int) -> datetime:
    return starts_at + timedelta(minutes=duration_minutes)


def start_window_opens_at(starts_at: datetime, rules: Rules) -> datetime:
    return starts_at - rules.start_window


def can_cancel(status: AppointmentStatus, ends: datetime, now: datetime) -> bool:
    """Cancelling is allowed while scheduled and not yet ended."""
    return status == "scheduled" and now < ends


def can_start(
    status: AppointmentStatus, starts_at: datetime, ends: datetime, now: datetime, rules: Rules
) -> bool:
    """Starting is allowed while scheduled and inside the start window; a started visit
    can be started again (the patient rejoins: a no-op success) until it ends."""
    if status == "started":
        return now < ends
    return status == "scheduled" and start_window_opens_at(starts_at, rules) <= now < ends


def visit_status(status: AppointmentStatus, ends: datetime, now: datetime) -> VisitStatus:
    """The visit's status at ``now``: an ended visit is completed (if started) or missed."""
    if status == "cancelled":
        return "cancelled"
    if now < ends:
        return status
    return "completed" if status == "started" else "missed"


def is_upcoming(status: AppointmentStatus, ends: datetime, now: datetime) -> bool:
    """Upcoming: not cancelled and not yet ended (a started visit stays until its end)."""
    return status != "cancelled" and now < ends
