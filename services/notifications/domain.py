"""What to notify and when: pure functions of the appointment, the event and the time.

Every notification gets a deterministic id from its cause (the event that made it due),
its kind and its recipient, so deciding twice decides the same notification.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Final, Literal, get_args

import msgspec

from contracts.common import Role
from contracts.events import AppointmentCancelled, AppointmentScheduled
from contracts.notifications import Notification, NotificationKind
from contracts.views import AppointmentStatus
from services.appointments.domain.rules import Rules, ends_at, start_window_opens_at
from services.notifications import messages

#: Fixed forever: changing it would give every notification a new id.
NOTIFICATION_NAMESPACE: Final = uuid.UUID("1f0c5d2e-8a4b-5c7e-9d3f-6b2a1e0c4d58")
REMINDER_LEAD: Final = timedelta(hours=24)

TimerKind = Literal["reminder-24h", "visit-ready"]
#: The kinds of notification a timer sends: a cancel or start makes them pointless.
REMINDER_KINDS: Final = frozenset(get_args(TimerKind))
#: The order in which a visit's notifications tell its story to a recipient, the order
#: they are delivered in: the booking, the reminders as its time comes (the 24 h one
#: expires when the start window opens, where "visit ready" is due), then its end. A visit
#: never decides one after a later one (a reminder fires only while it is scheduled), so
#: the earlier ones are stored by the time a later one is claimed.
VISIT_ORDER: Final[tuple[NotificationKind, ...]] = (
    "appointment-confirmed",
    "reminder-24h",
    "visit-ready",
    "appointment-cancelled",
)


def notification_id(cause_event_id: uuid.UUID, kind: str, recipient_id: uuid.UUID) -> uuid.UUID:
    """The id of the ``kind`` notification that ``cause_event_id`` makes due to a recipient."""
    return uuid.uuid5(NOTIFICATION_NAMESPACE, f"{cause_event_id}/{kind}/{recipient_id}")


class Appointment(msgspec.Struct, frozen=True, kw_only=True):
    """The appointment as far as notifications need it."""

    appointment_id: uuid.UUID
    clinic_id: uuid.UUID
    patient_id: uuid.UUID
    provider_id: uuid.UUID
    starts_at: datetime
    duration_minutes: int
    timezone: str
    status: AppointmentStatus
    scheduled_event_id: uuid.UUID

    @property
    def ends_at(self) -> datetime:
        """When the visit is over (the end of its start window)."""
        return ends_at(self.starts_at, self.duration_minutes)


class PlannedNotification(msgspec.Struct, frozen=True, kw_only=True):
    """A notification decided on, not yet sent."""

    notification_id: uuid.UUID
    kind: NotificationKind
    recipient_id: uuid.UUID
    recipient_role: Role
    appointment_id: uuid.UUID
    clinic_id: uuid.UUID
    cause_event_id: uuid.UUID
    title: str
    body: str

    def sent(self, at: datetime) -> Notification:
        """The wire shape of this notification, sent ``at``."""
        return Notification(
            notification_id=self.notification_id,
            kind=self.kind,
            recipient_id=self.recipient_id,
            recipient_role=self.recipient_role,
            appointment_id=self.appointment_id,
            clinic_id=self.clinic_id,
            cause_event_id=self.cause_event_id,
            title=self.title,
            body=self.body,
            sent_at=at,
        )


class Timer(msgspec.Struct, frozen=True, kw_only=True):
    """A reminder due at ``due_at``; one that fires at or after ``expires_at`` is dropped."""

    appointment_id: uuid.UUID
    kind: TimerKind
    cause_event_id: uuid.UUID
    due_at: datetime
    expires_at: datetime


def appointment_of(
    appointment_id: uuid.UUID, event_id: uuid.UUID, event: AppointmentScheduled
) -> Appointment:
    """The appointment an ``AppointmentScheduled`` event creates."""
    return Appointment(
        appointment_id=appointment_id,
        clinic_id=event.clinic_id,
        patient_id=event.patient_id,
        provider_id=event.provider_id,
        starts_at=event.starts_at,
        duration_minutes=event.duration_minutes,
        timezone=event.timezone,
        status="scheduled",
        scheduled_event_id=event_id,
    )


def _recipient(appointment: Appointment, role: Role) -> uuid.UUID:
    return appointment.patient_id if role == "patient" else appointment.provider_id


def _planned(
    appointment: Appointment,
    kind: NotificationKind,
    cause_event_id: uuid.UUID,
    recipient_role: Role,
    text: messages.Text,
) -> PlannedNotification:
    recipient_id = _recipient(appointment, recipient_role)
    return PlannedNotification(
        notification_id=notification_id(cause_event_id, kind, recipient_id),
        kind=kind,
        recipient_id=recipient_id,
        recipient_role=recipient_role,
        appointment_id=appointment.appointment_id,
        clinic_id=appointment.clinic_id,
        cause_event_id=cause_event_id,
        title=text[0],
        body=text[1],
    )


def on_scheduled(appointment: Appointment) -> list[PlannedNotification]:
    """A booking is confirmed to the patient and to the provider."""
    a = appointment
    return [
        _planned(
            a,
            "appointment-confirmed",
            a.scheduled_event_id,
            role,
            messages.confirmed(role, a.starts_at, a.timezone, a.duration_minutes),
        )
        for role in ("patient", "provider")
    ]


def timers_of(appointment: Appointment, scheduled_at: datetime, rules: Rules) -> list[Timer]:
    """The reminders of an appointment booked at ``scheduled_at``.

    A reminder whose time had already passed when the appointment was booked is never
    set (no 24 h reminder for a visit booked 2 h ahead); one booked inside its start
    window is ready at once.
    """
    a = appointment
    opens_at = start_window_opens_at(a.starts_at, rules)
    timers: list[Timer] = []
    reminder_at = a.starts_at - REMINDER_LEAD
    if scheduled_at < reminder_at < opens_at:
        timers.append(_timer(a, "reminder-24h", reminder_at, expires_at=opens_at))
    if scheduled_at < a.ends_at:
        timers.append(_timer(a, "visit-ready", max(opens_at, scheduled_at), a.ends_at))
    return timers


def _timer(a: Appointment, kind: TimerKind, due_at: datetime, expires_at: datetime) -> Timer:
    return Timer(
        appointment_id=a.appointment_id,
        kind=kind,
        cause_event_id=a.scheduled_event_id,
        due_at=due_at,
        expires_at=expires_at,
    )


def on_cancelled(
    appointment: Appointment, event_id: uuid.UUID, event: AppointmentCancelled
) -> list[PlannedNotification]:
    """The patient always hears of a cancellation (their own one as a confirmation); the
    provider hears of it unless they cancelled it themselves."""
    a = appointment
    by = event.cancelled_by
    roles: list[Role] = ["patient"] if by.id == a.provider_id else ["patient", "provider"]
    return [
        _planned(
            a,
            "appointment-cancelled",
            event_id,
            role,
            messages.cancelled(
                role, by.role, by.id == _recipient(a, role), a.starts_at, a.timezone
            ),
        )
        for role in roles
    ]


def on_timer(appointment: Appointment, timer: Timer, now: datetime) -> list[PlannedNotification]:
    """What a due reminder sends, worded for ``now``: nothing once the appointment is no
    longer scheduled, or once the reminder is too late to mean anything (its
    ``expires_at``). A 24 h reminder that fires late still goes out until the start window
    opens (then "your visit can start now" says more), but names the visit's day from the
    recipient's date at ``now`` in the appointment's timezone: "today" for a visit today,
    never a false "tomorrow"."""
    a = appointment
    if a.status != "scheduled" or now >= timer.expires_at:
        return []
    if timer.kind == "reminder-24h":
        text = messages.reminder_24h(a.starts_at, a.timezone, now)
    else:
        text = messages.visit_ready(a.starts_at, a.timezone)
    return [_planned(a, timer.kind, timer.cause_event_id, "patient", text)]
