"""Titles and bodies of the notifications, with times in the appointment's own timezone.

English only for now. No visit reason and no cancellation reason: a push message shows on a
locked screen, and those free texts may hold health information.
"""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime, tzinfo
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from contracts.common import Role

log = logging.getLogger(__name__)

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS: Final = (
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
)  # fmt: skip

Text = tuple[str, str]
"""(title, body)"""


@functools.lru_cache(maxsize=1024)
def zone(timezone: str) -> tzinfo:
    """``timezone``, or UTC when this process's tz database lacks it (the API that took the
    booking had another one: an image built on another base): the message then names the
    time in UTC, rightly, where failing would leave the visit without any notification.
    Said once per name (each message asks several times)."""
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        log.warning("time zone %r unknown here: the message names the time in UTC", timezone)
        return UTC


def local_time(at: datetime, timezone: str) -> str:
    """``Tue 15 Jan 2030 at 15:00 CET``: ``at`` as a clock on the wall of ``timezone`` shows it.

    Spelled out here rather than with ``strftime`` so the process locale never changes it.
    """
    local = at.astimezone(zone(timezone))
    day = f"{_DAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]} {local.year}"
    return f"{day} at {local:%H:%M} {local.tzname()}"


def confirmed(role: Role, starts_at: datetime, timezone: str, duration_minutes: int) -> Text:
    """The confirmation of a booking, for the patient or the provider."""
    when = local_time(starts_at, timezone)
    if role == "patient":
        return (
            "Visit confirmed",
            f"Your video visit is booked for {when} ({duration_minutes} min).",
        )
    return (
        "New visit booked",
        f"A video visit with a patient is booked for {when} ({duration_minutes} min).",
    )


def cancelled(
    role: Role, cancelled_by: Role, own: bool, starts_at: datetime, timezone: str
) -> Text:
    """The notice of a cancellation, saying by whom; the canceller's ``own`` is a confirmation."""
    when = local_time(starts_at, timezone)
    if own:
        return ("Visit cancelled", f"You cancelled your video visit of {when}.")
    by = {
        "patient": "The patient",
        "provider": "Your provider" if role == "patient" else "The provider",
        "staff": "The clinic",
    }[cancelled_by]
    whose = "your" if role == "patient" else "the"
    return ("Visit cancelled", f"{by} cancelled {whose} video visit of {when}.")


def reminder_24h(starts_at: datetime, timezone: str, now: datetime) -> Text:
    """The reminder a day before, worded for when it is sent (``now``): the day is named
    from the recipient's date then, in the appointment's timezone, so a reminder that goes
    out late (after an outage, a backlog) says "today" for a visit today, and one across a
    daylight-saving change never says "tomorrow" of a visit two dates away."""
    when = local_time(starts_at, timezone)
    local = zone(timezone)
    days = (starts_at.astimezone(local).date() - now.astimezone(local).date()).days
    title = {0: "Visit today", 1: "Visit tomorrow"}.get(days, "Upcoming visit")
    return (title, f"Reminder: your video visit is on {when}.")


def visit_ready(starts_at: datetime, timezone: str) -> Text:
    """The start window is open: the visit can start now."""
    when = local_time(starts_at, timezone)
    return (
        "Your visit can start now",
        f"Your video visit of {when} can start now. Open the app to join.",
    )
