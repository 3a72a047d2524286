"""The time rules shared by commands and reads, and the appointment view built on them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.common import Actor, Principal
from contracts.views import AppointmentStatus
from services.appointments.domain.commands import CancelAppointment, StartAppointment
from services.appointments.domain.decider import decide
from services.appointments.domain.rules import (
    DEFAULT_START_WINDOW,
    Rules,
    can_cancel,
    can_start,
    ends_at,
    is_upcoming,
    start_window_opens_at,
    visit_status,
)
from services.appointments.domain.state import (
    Booking,
    Cancelled,
    NotScheduled,
    Scheduled,
    Started,
)
from services.appointments.domain.view import appointment_view
from services.errors import AppointmentPast, ClinicError

APPOINTMENT_ID = UUID(int=1)
CLINIC_ID = UUID(int=10)
PATIENT = Principal(id=UUID(int=100), role="patient", clinic_id=CLINIC_ID)
PROVIDER_ID = UUID(int=200)
STAFF = Actor(id=UUID(int=300), role="staff")

STARTS_AT = datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
DURATION = 30
ENDS_AT = STARTS_AT + timedelta(minutes=DURATION)
OPENS_AT = STARTS_AT - timedelta(minutes=15)
MICROSECOND = timedelta(microseconds=1)
RULES = Rules()

PARIS_SUMMER = timezone(timedelta(hours=2))


def booking(starts_at: datetime = STARTS_AT) -> Booking:
    return Booking(
        clinic_id=CLINIC_ID,
        patient_id=PATIENT.id,
        provider_id=PROVIDER_ID,
        starts_at=starts_at,
        duration_minutes=DURATION,
        timezone="Europe/Paris",
        visit_reason="Follow-up",
        scheduled_by=STAFF,
    )


# --- ends_at and the start window -------------------------------------------------------


def test_an_appointment_ends_duration_minutes_after_it_starts() -> None:
    assert ends_at(STARTS_AT, DURATION) == ENDS_AT
    assert booking().ends_at == ENDS_AT


def test_start_window_opens_15_minutes_before_by_default() -> None:
    assert Rules().start_window == DEFAULT_START_WINDOW
    assert timedelta(minutes=15) == DEFAULT_START_WINDOW
    assert start_window_opens_at(STARTS_AT, Rules()) == OPENS_AT


def test_start_window_follows_the_deployment_setting() -> None:
    rules = Rules(start_window=timedelta(minutes=5))

    assert start_window_opens_at(STARTS_AT, rules) == STARTS_AT - timedelta(minutes=5)


# --- visit_status -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "now", "expected"),
    [
        ("scheduled", STARTS_AT - timedelta(days=1), "scheduled"),
        ("scheduled", ENDS_AT - MICROSECOND, "scheduled"),
        ("scheduled", ENDS_AT, "missed"),
        ("started", STARTS_AT, "started"),
        ("started", ENDS_AT - MICROSECOND, "started"),
        ("started", ENDS_AT, "completed"),
        ("cancelled", STARTS_AT - timedelta(days=1), "cancelled"),
        ("cancelled", ENDS_AT + timedelta(days=1), "cancelled"),
    ],
)
def test_visit_status_is_completed_or_missed_once_ended_and_cancelled_forever(
    status: AppointmentStatus, now: datetime, expected: str
) -> None:
    assert visit_status(status, ENDS_AT, now) == expected


# --- is_upcoming ------------------------------------------------------------------------


def test_scheduled_visit_is_upcoming_until_its_end() -> None:
    assert is_upcoming("scheduled", ENDS_AT, STARTS_AT - timedelta(days=1))
    assert is_upcoming("scheduled", ENDS_AT, ENDS_AT - MICROSECOND)
    assert not is_upcoming("scheduled", ENDS_AT, ENDS_AT)


def test_started_visit_stays_upcoming_until_its_end_so_the_patient_can_rejoin() -> None:
    assert is_upcoming("started", ENDS_AT, ENDS_AT - MICROSECOND)
    assert not is_upcoming("started", ENDS_AT, ENDS_AT)


def test_cancelled_visit_is_never_upcoming() -> None:
    assert not is_upcoming("cancelled", ENDS_AT, STARTS_AT - timedelta(days=1))


# --- can_cancel -------------------------------------------------------------------------


def test_can_cancel_while_scheduled_and_not_ended() -> None:
    assert can_cancel("scheduled", ENDS_AT, STARTS_AT - timedelta(days=1))
    assert can_cancel("scheduled", ENDS_AT, ENDS_AT - MICROSECOND)


def test_cannot_cancel_once_ended() -> None:
    assert not can_cancel("scheduled", ENDS_AT, ENDS_AT)


@pytest.mark.parametrize("status", ["started", "cancelled"])
def test_cannot_cancel_a_started_or_cancelled_appointment(status: AppointmentStatus) -> None:
    assert not can_cancel(status, ENDS_AT, STARTS_AT - timedelta(hours=1))


# --- can_start --------------------------------------------------------------------------


def test_can_start_from_the_window_opening_until_the_end() -> None:
    assert can_start("scheduled", STARTS_AT, ENDS_AT, OPENS_AT, RULES)
    assert can_start("scheduled", STARTS_AT, ENDS_AT, ENDS_AT - MICROSECOND, RULES)


def test_cannot_start_before_the_window_opens() -> None:
    assert not can_start("scheduled", STARTS_AT, ENDS_AT, OPENS_AT - MICROSECOND, RULES)


def test_cannot_start_once_ended() -> None:
    assert not can_start("scheduled", STARTS_AT, ENDS_AT, ENDS_AT, RULES)


def test_cannot_start_a_cancelled_appointment() -> None:
    assert not can_start("cancelled", STARTS_AT, ENDS_AT, STARTS_AT, RULES)


def test_a_started_visit_can_be_rejoined_until_it_ends() -> None:
    assert can_start("started", STARTS_AT, ENDS_AT, STARTS_AT, RULES)
    assert can_start("started", STARTS_AT, ENDS_AT, ENDS_AT - MICROSECOND, RULES)
    assert not can_start("started", STARTS_AT, ENDS_AT, ENDS_AT, RULES)
    # Started early under a wider window: still rejoinable before today's window opens.
    assert can_start("started", STARTS_AT, ENDS_AT, OPENS_AT - MICROSECOND, RULES)


def test_can_start_follows_the_configured_window() -> None:
    rules = Rules(start_window=timedelta(minutes=5))
    opens_at = STARTS_AT - timedelta(minutes=5)

    assert not can_start("scheduled", STARTS_AT, ENDS_AT, opens_at - MICROSECOND, rules)
    assert can_start("scheduled", STARTS_AT, ENDS_AT, opens_at, rules)


# --- the read-side flags agree with the decider -----------------------------------------

offsets = st.one_of(
    st.sampled_from([timedelta(minutes=m) for m in (-60, -16, -15, -5, 0, 29, 30, 31)]),
    st.timedeltas(min_value=timedelta(hours=-2), max_value=timedelta(hours=2)),
)
windows = st.sampled_from([timedelta(0), timedelta(minutes=15), timedelta(hours=1)])


def _accepted(command: CancelAppointment | StartAppointment, now: datetime, rules: Rules) -> bool:
    try:
        return decide(Scheduled(booking()), command, now, rules) != []
    except ClinicError:
        return False


@settings(max_examples=200, deadline=None)
@given(offset=offsets, window=windows)
def test_can_start_is_true_exactly_when_the_decider_starts(
    offset: timedelta, window: timedelta
) -> None:
    now, rules = STARTS_AT + offset, Rules(start_window=window)
    command = StartAppointment(appointment_id=APPOINTMENT_ID, actor=PATIENT)

    assert can_start("scheduled", STARTS_AT, ENDS_AT, now, rules) == _accepted(command, now, rules)


@settings(max_examples=200, deadline=None)
@given(offset=offsets)
def test_can_cancel_is_true_exactly_when_the_decider_cancels(offset: timedelta) -> None:
    now = STARTS_AT + offset
    command = CancelAppointment(appointment_id=APPOINTMENT_ID, actor=PATIENT)

    assert can_cancel("scheduled", ENDS_AT, now) == _accepted(command, now, RULES)


# --- appointment_view -------------------------------------------------------------------


def test_view_of_a_scheduled_appointment_shows_the_booking_in_utc() -> None:
    state = Scheduled(booking(STARTS_AT.astimezone(PARIS_SUMMER)))

    view = appointment_view(APPOINTMENT_ID, state, 1, OPENS_AT - timedelta(hours=1), RULES)

    assert view.appointment_id == APPOINTMENT_ID
    assert (view.clinic_id, view.patient_id, view.provider_id) == (
        CLINIC_ID,
        PATIENT.id,
        PROVIDER_ID,
    )
    assert view.status == "scheduled"
    assert view.version == 1
    assert view.duration_minutes == DURATION
    assert view.timezone == "Europe/Paris"
    assert view.visit_reason == "Follow-up"
    for instant in (view.starts_at, view.ends_at, view.start_window_opens_at):
        assert instant.tzinfo is UTC
    assert view.starts_at == STARTS_AT
    assert view.ends_at == ENDS_AT
    assert view.start_window_opens_at == OPENS_AT
    assert (view.cancelled_at, view.cancelled_by, view.cancellation_reason) == (None, None, None)
    assert view.started_at is None


@pytest.mark.parametrize(
    ("now", "can_cancel_", "can_start_"),
    [
        (OPENS_AT - MICROSECOND, True, False),
        (OPENS_AT, True, True),
        (ENDS_AT - MICROSECOND, True, True),
        (ENDS_AT, False, False),
    ],
)
def test_view_flags_of_a_scheduled_appointment_follow_the_clock(
    now: datetime, can_cancel_: bool, can_start_: bool
) -> None:
    view = appointment_view(APPOINTMENT_ID, Scheduled(booking()), 1, now, RULES)

    assert (view.can_cancel, view.can_start) == (can_cancel_, can_start_)


def test_view_start_window_follows_the_deployment_setting() -> None:
    rules = Rules(start_window=timedelta(minutes=5))
    opens_at = STARTS_AT - timedelta(minutes=5)

    before = appointment_view(
        APPOINTMENT_ID, Scheduled(booking()), 1, opens_at - MICROSECOND, rules
    )
    at = appointment_view(APPOINTMENT_ID, Scheduled(booking()), 1, opens_at, rules)

    assert before.start_window_opens_at == opens_at
    assert (before.can_start, at.can_start) == (False, True)


def test_view_of_a_cancelled_appointment_says_who_when_and_why() -> None:
    cancelled_at = (OPENS_AT - timedelta(hours=1)).astimezone(PARIS_SUMMER)
    state = Cancelled(booking(), PATIENT.actor, "Feeling better", cancelled_at)

    view = appointment_view(APPOINTMENT_ID, state, 2, OPENS_AT, RULES)

    assert view.status == "cancelled"
    assert view.version == 2
    assert view.cancelled_at == cancelled_at
    assert view.cancelled_at is not None and view.cancelled_at.tzinfo is UTC
    assert view.cancelled_by == PATIENT.actor
    assert view.cancellation_reason == "Feeling better"
    assert view.started_at is None
    assert (view.can_cancel, view.can_start) == (False, False)


def test_view_of_a_started_appointment_says_when_and_allows_only_rejoining() -> None:
    started_at = STARTS_AT.astimezone(PARIS_SUMMER)
    state = Started(booking(), PATIENT.actor, started_at)

    view = appointment_view(APPOINTMENT_ID, state, 2, STARTS_AT + timedelta(minutes=1), RULES)
    ended = appointment_view(APPOINTMENT_ID, state, 2, ENDS_AT, RULES)

    assert view.status == "started"
    assert view.started_at == started_at
    assert view.started_at is not None and view.started_at.tzinfo is UTC
    assert (view.cancelled_at, view.cancelled_by, view.cancellation_reason) == (None, None, None)
    assert (view.can_cancel, view.can_start) == (False, True)
    assert (ended.can_cancel, ended.can_start) == (False, False)


@settings(max_examples=200, deadline=None)
@given(offset=offsets)
def test_a_started_visit_offers_rejoining_exactly_while_it_is_upcoming(
    offset: timedelta,
) -> None:
    # Starting again succeeds without a new event while the visit goes on (the rejoin of
    # an ongoing visit) and is refused once it is over: exactly when the view offers it.
    now = STARTS_AT + offset
    state = Started(booking(), PATIENT.actor, STARTS_AT)
    command = StartAppointment(appointment_id=APPOINTMENT_ID, actor=PATIENT)

    offered = can_start("started", STARTS_AT, ENDS_AT, now, RULES)
    assert offered == is_upcoming("started", ENDS_AT, now)
    if offered:
        assert decide(state, command, now, RULES) == []
    else:
        with pytest.raises(AppointmentPast):
            decide(state, command, now, RULES)


def test_an_unscheduled_appointment_has_no_view() -> None:
    with pytest.raises(ValueError):
        appointment_view(APPOINTMENT_ID, NotScheduled(), 0, STARTS_AT, RULES)
