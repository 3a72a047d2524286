"""What to notify and when: given an appointment and an event / a time, then notifications."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from contracts.common import Actor, Role
from contracts.events import AppointmentCancelled, AppointmentScheduled
from contracts.views import AppointmentStatus
from services.appointments.domain.rules import Rules
from services.notifications.delivery_store import outdated_by
from services.notifications.domain import (
    Appointment,
    Timer,
    appointment_of,
    notification_id,
    on_cancelled,
    on_scheduled,
    on_timer,
    timers_of,
)

NOW = datetime(2030, 1, 12, 9, 0, tzinfo=UTC)
STARTS_AT = datetime(2030, 1, 15, 14, 0, tzinfo=UTC)
RULES = Rules()


def appointment(starts_at: datetime = STARTS_AT, timezone: str = "Europe/Berlin") -> Appointment:
    patient, provider = uuid.uuid4(), uuid.uuid4()
    event = AppointmentScheduled(
        clinic_id=uuid.uuid4(),
        patient_id=patient,
        provider_id=provider,
        starts_at=starts_at,
        duration_minutes=30,
        timezone=timezone,
        visit_reason="knee pain",
        scheduled_by=Actor(id=patient, role="patient"),
    )
    return appointment_of(uuid.uuid4(), uuid.uuid4(), event)


def cancellation(by: Actor) -> AppointmentCancelled:
    return AppointmentCancelled(clinic_id=uuid.uuid4(), cancelled_by=by, cancelled_at=NOW)


def test_a_notification_id_depends_only_on_cause_kind_and_recipient() -> None:
    cause, recipient = uuid.uuid4(), uuid.uuid4()
    same = notification_id(cause, "reminder-24h", recipient)
    assert same == notification_id(cause, "reminder-24h", recipient)
    assert same != notification_id(cause, "visit-ready", recipient)
    assert same != notification_id(cause, "reminder-24h", uuid.uuid4())
    assert same != notification_id(uuid.uuid4(), "reminder-24h", recipient)


def test_deciding_twice_decides_the_same_notifications() -> None:
    a = appointment()
    assert on_scheduled(a) == on_scheduled(a)


def test_a_booking_is_confirmed_to_the_patient_and_to_the_provider() -> None:
    a = appointment()
    confirmations = on_scheduled(a)
    assert [(n.recipient_id, n.recipient_role) for n in confirmations] == [
        (a.patient_id, "patient"),
        (a.provider_id, "provider"),
    ]
    assert {n.kind for n in confirmations} == {"appointment-confirmed"}
    assert {n.cause_event_id for n in confirmations} == {a.scheduled_event_id}
    assert all("15:00 CET" in n.body for n in confirmations)
    assert all("knee" not in n.body + n.title for n in confirmations)


@pytest.mark.parametrize(
    ("by_role", "recipients"),
    [
        ("patient", ["patient", "provider"]),
        ("provider", ["patient"]),
        ("staff", ["patient", "provider"]),
    ],
)
def test_a_cancellation_goes_to_who_did_not_cancel_and_to_a_cancelling_patient(
    by_role: Role, recipients: list[Role]
) -> None:
    a = appointment()
    by_id = {"patient": a.patient_id, "provider": a.provider_id, "staff": uuid.uuid4()}[by_role]
    event_id = uuid.uuid4()
    notices = on_cancelled(a, event_id, cancellation(Actor(id=by_id, role=by_role)))
    assert [n.recipient_role for n in notices] == recipients
    assert {n.cause_event_id for n in notices} == {event_id}
    assert {n.kind for n in notices} == {"appointment-cancelled"}


def test_a_visit_booked_days_ahead_gets_a_24h_reminder_and_visit_ready() -> None:
    a = appointment()
    reminder, ready = timers_of(a, NOW, RULES)
    assert (reminder.kind, reminder.due_at) == ("reminder-24h", STARTS_AT - timedelta(hours=24))
    assert reminder.expires_at == STARTS_AT - timedelta(minutes=15)
    assert (ready.kind, ready.due_at) == ("visit-ready", STARTS_AT - timedelta(minutes=15))
    assert ready.expires_at == STARTS_AT + timedelta(minutes=30)
    assert {reminder.cause_event_id, ready.cause_event_id} == {a.scheduled_event_id}


def test_no_24h_reminder_for_a_visit_booked_2h_ahead() -> None:
    a = appointment(starts_at=NOW + timedelta(hours=2))
    assert [t.kind for t in timers_of(a, NOW, RULES)] == ["visit-ready"]


def test_the_reminders_edges_are_the_booking_instant_excluded() -> None:
    # Booked exactly 24 h ahead: the confirmation says it all, no reminder at once; a
    # microsecond earlier, the reminder is due 24 h before.
    a = appointment(starts_at=NOW + timedelta(hours=24))
    assert [t.kind for t in timers_of(a, NOW, RULES)] == ["visit-ready"]
    earlier = timers_of(a, NOW - timedelta(microseconds=1), RULES)
    assert [(t.kind, t.due_at) for t in earlier[:1]] == [("reminder-24h", NOW)]
    # Booked (recorded) exactly at the visit's end: nothing is ready any more.
    ended = appointment(starts_at=NOW - timedelta(minutes=30))  # 30 minutes long
    assert timers_of(ended, NOW, RULES) == []
    (ready,) = timers_of(ended, NOW - timedelta(microseconds=1), RULES)
    assert (ready.kind, ready.expires_at) == ("visit-ready", NOW)


def test_a_visit_booked_inside_its_start_window_is_ready_at_once() -> None:
    a = appointment(starts_at=NOW + timedelta(minutes=10))
    (ready,) = timers_of(a, NOW, RULES)
    assert (ready.kind, ready.due_at) == ("visit-ready", NOW)


def test_the_start_window_setting_moves_visit_ready() -> None:
    a = appointment()
    rules = Rules(start_window=timedelta(minutes=45))
    ready = timers_of(a, NOW, rules)[-1]
    assert ready.due_at == STARTS_AT - timedelta(minutes=45)


def test_a_visit_that_already_ended_gets_no_reminders() -> None:
    a = appointment(starts_at=NOW - timedelta(hours=1))
    assert timers_of(a, NOW, RULES) == []


def _timer(a: Appointment, kind: str) -> Timer:
    return next(t for t in timers_of(a, NOW, RULES) if t.kind == kind)


def test_a_due_reminder_goes_to_the_patient() -> None:
    a = appointment()
    timer = _timer(a, "reminder-24h")
    (reminder,) = on_timer(a, timer, timer.due_at)
    assert (reminder.kind, reminder.recipient_id) == ("reminder-24h", a.patient_id)
    assert reminder.notification_id == notification_id(
        a.scheduled_event_id, "reminder-24h", a.patient_id
    )


@pytest.mark.parametrize("status", ["cancelled", "started"])
def test_a_reminder_of_a_cancelled_or_started_appointment_sends_nothing(
    status: AppointmentStatus,
) -> None:
    a = appointment()
    timer = _timer(a, "visit-ready")
    gone = msgspec.structs.replace(a, status=status)
    assert on_timer(gone, timer, timer.due_at) == []


def test_a_reminder_firing_after_it_expired_sends_nothing() -> None:
    a = appointment()
    timer = _timer(a, "reminder-24h")
    assert on_timer(a, timer, timer.expires_at) == []
    assert on_timer(a, timer, timer.expires_at - timedelta(seconds=1)) != []


def test_the_notification_namespace_never_changes() -> None:
    # Every stored notification id derives from it: a new one would send everything again.
    assert notification_id(uuid.UUID(int=1), "reminder-24h", uuid.UUID(int=2)) == uuid.UUID(
        "9aee1f4c-cbf7-54ff-9ed6-ed57c917ebaf"
    )


def test_each_timer_sends_its_own_message() -> None:
    a = appointment()
    reminder = _timer(a, "reminder-24h")
    ready = _timer(a, "visit-ready")
    (day_before,) = on_timer(a, reminder, reminder.due_at)
    (now_open,) = on_timer(a, ready, ready.due_at)
    assert day_before.title == "Visit tomorrow" and "15:00 CET" in day_before.body
    assert now_open.title == "Your visit can start now" and "can start now" in now_open.body


@pytest.mark.parametrize(
    ("by_role", "patient_reads", "provider_reads"),
    [
        ("patient", "You cancelled your video visit", "The patient cancelled the video visit"),
        ("provider", "Your provider cancelled your video visit", None),
        ("staff", "The clinic cancelled your video visit", "The clinic cancelled the video visit"),
    ],
)
def test_a_cancellation_notice_says_who_cancelled(
    by_role: Role, patient_reads: str, provider_reads: str | None
) -> None:
    a = appointment()
    by_id = {"patient": a.patient_id, "provider": a.provider_id, "staff": uuid.uuid4()}[by_role]
    notices = on_cancelled(a, uuid.uuid4(), cancellation(Actor(id=by_id, role=by_role)))
    bodies = {n.recipient_role: n.body for n in notices}
    assert bodies["patient"].startswith(patient_reads)
    if provider_reads is None:
        assert "provider" not in bodies
    else:
        assert bodies["provider"].startswith(provider_reads)


# ------------------------------------------------- a delivery claimed too late to send


ENDS_AT = STARTS_AT + timedelta(minutes=30)


@pytest.mark.parametrize(
    ("kind", "attempts", "status", "now", "why"),
    [
        ("visit-ready", 1, "scheduled", ENDS_AT - timedelta(seconds=1), None),
        ("visit-ready", 1, "scheduled", ENDS_AT, "after the visit's end"),
        ("reminder-24h", 3, "scheduled", ENDS_AT + timedelta(hours=5), "after the visit's end"),
        # Too late whatever the news: not sent again ahead of a cancellation either.
        ("visit-ready", 1, "cancelled", ENDS_AT, "after the visit's end"),
        (
            "visit-ready",
            1,
            "cancelled",
            ENDS_AT - timedelta(seconds=1),
            "after AppointmentCancelled",
        ),
        ("appointment-confirmed", 2, "cancelled", STARTS_AT, "after the visit began"),
        (
            "appointment-confirmed",
            2,
            "cancelled",
            STARTS_AT - timedelta(seconds=1),
            "after AppointmentCancelled",
        ),
        ("reminder-24h", 1, "started", STARTS_AT, "after AppointmentStarted"),
        # A confirmation once the visit has begun, a cancellation once it is over: the
        # rules the consumer applies to late events (handlers.py), at claim time too.
        ("appointment-confirmed", 1, "scheduled", STARTS_AT - timedelta(seconds=1), None),
        ("appointment-confirmed", 1, "scheduled", STARTS_AT, "after the visit began"),
        (
            "appointment-confirmed",
            4,
            "scheduled",
            ENDS_AT + timedelta(days=1),
            "after the visit began",
        ),
        ("appointment-cancelled", 1, "cancelled", ENDS_AT - timedelta(seconds=1), None),
        ("appointment-cancelled", 1, "cancelled", ENDS_AT, "after the visit's end"),
        (
            "appointment-cancelled",
            2,
            "cancelled",
            ENDS_AT + timedelta(days=1),
            "after the visit's end",
        ),
    ],
)
def test_a_reminder_claimed_once_its_visit_is_over_is_outdated(
    kind: str, attempts: int, status: str, now: datetime, why: str | None
) -> None:
    assert outdated_by(kind, attempts, status, ENDS_AT, now, visit_starts_at=STARTS_AT) == why


OPENS_AT = STARTS_AT - timedelta(minutes=15)


@pytest.mark.parametrize(
    ("kind", "now", "why"),
    [
        ("reminder-24h", OPENS_AT - timedelta(seconds=1), None),
        # Its timer would be dropped now: "your visit can start now" says more.
        ("reminder-24h", OPENS_AT, "after the visit's start window opened"),
        ("reminder-24h", ENDS_AT - timedelta(seconds=1), "after the visit's start window opened"),
        ("reminder-24h", ENDS_AT, "after the visit's end"),
        ("visit-ready", OPENS_AT, None),
        ("visit-ready", ENDS_AT - timedelta(seconds=1), None),
        ("appointment-confirmed", OPENS_AT, None),
    ],
)
def test_a_24h_reminder_claimed_once_the_start_window_is_open_is_outdated(
    kind: str, now: datetime, why: str | None
) -> None:
    assert outdated_by(kind, 1, "scheduled", ENDS_AT, now, window_opens_at=OPENS_AT) == why
