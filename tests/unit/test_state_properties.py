"""Properties of the appointment state machine over any sequence of commands and clock readings.

One stream (one appointment id), a small population of people in two clinics acting in any
role, and a clock that never runs backwards: small enough that schedules collide, retries
happen and windows are hit, so every branch of the decider is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeVar
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import event as record_statistic
from hypothesis import strategies as st

from contracts.commands import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES
from contracts.common import MAX_TEXT_LENGTH, ROLES, Principal
from contracts.errors import ErrorCode
from contracts.events import AppointmentCancelled, AppointmentScheduled, AppointmentStarted, Event
from services.appointments.domain.commands import (
    CancelAppointment,
    Command,
    ScheduleAppointment,
    StartAppointment,
)
from services.appointments.domain.decider import decide, is_valid_timezone
from services.appointments.domain.rules import Rules, start_window_opens_at
from services.appointments.domain.state import (
    INITIAL,
    Cancelled,
    NotScheduled,
    Scheduled,
    Started,
    State,
    fold,
)
from services.errors import ClinicError

APPOINTMENT_ID = UUID(int=1)
CLINICS = [UUID(int=10), UUID(int=11)]
PATIENT_IDS = [UUID(int=100), UUID(int=101)]
PROVIDER_IDS = [UUID(int=200), UUID(int=201)]
STAFF_IDS = [UUID(int=300)]
PEOPLE = PATIENT_IDS + PROVIDER_IDS + STAFF_IDS

BASE = datetime(2030, 6, 1, 9, 0, tzinfo=UTC)
TERMINAL = (AppointmentCancelled, AppointmentStarted)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

T = TypeVar("T")


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of ``choices``, each drawn in proportion to its weight."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


#: The patient, the provider and a staff member of the appointment most schedules book.
INSIDERS = [
    Principal(id=PATIENT_IDS[0], role="patient", clinic_id=CLINICS[0]),
    Principal(id=PROVIDER_IDS[0], role="provider", clinic_id=CLINICS[0]),
    Principal(id=STAFF_IDS[0], role="staff", clinic_id=CLINICS[0]),
]
anyone = st.builds(
    Principal,
    id=st.sampled_from(PEOPLE),
    role=st.sampled_from(ROLES),
    clinic_id=st.sampled_from(CLINICS),
)
actors = weighted((2, st.sampled_from(INSIDERS)), (1, anyone))

# Few distinct instants so that retries repeat a body exactly; edges of the rules included.
starts_at_offsets = st.one_of(
    st.sampled_from(
        [
            timedelta(minutes=-60),
            timedelta(0),
            timedelta(minutes=30),
            timedelta(hours=2),
            timedelta(days=1),
            timedelta(days=365),
            timedelta(days=366),
        ]
    ),
    st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=400)),
)
zones = st.sampled_from([UTC, UTC, UTC, timezone(timedelta(hours=2)), None])
durations = st.one_of(
    st.sampled_from([30, 30, 60, MIN_DURATION_MINUTES, MAX_DURATION_MINUTES]),
    st.integers(min_value=-10, max_value=300),
)
timezones = st.one_of(
    st.sampled_from(["Europe/Paris", "Europe/Paris", "UTC", "Nowhere/Atlantis", "", "../x"]),
    st.text(max_size=20),
)
reasons = st.one_of(
    st.none(),
    st.sampled_from(["", "Checkup", "x" * MAX_TEXT_LENGTH, "x" * (MAX_TEXT_LENGTH + 1)]),
    st.text(max_size=10),
)


@st.composite
def starts_ats(draw: st.DrawFn) -> datetime:
    instant = BASE + draw(starts_at_offsets)
    zone = draw(zones)
    return instant.replace(tzinfo=None) if zone is None else instant.astimezone(zone)


#: Bookings that succeed when the clock is early enough; identical ones are exact retries.
plausible_schedules = st.builds(
    ScheduleAppointment,
    appointment_id=st.just(APPOINTMENT_ID),
    actor=st.sampled_from(INSIDERS),
    patient_id=st.just(PATIENT_IDS[0]),
    provider_id=st.just(PROVIDER_IDS[0]),
    starts_at=st.sampled_from([BASE + timedelta(minutes=m) for m in (20, 60, 120)]),
    duration_minutes=st.sampled_from([30, 60]),
    timezone=st.just("Europe/Paris"),
    visit_reason=st.sampled_from([None, "Checkup"]),
)
#: Anything: any actor, naive or out-of-range times, bad zones, over-long reasons.
hostile_schedules = st.builds(
    ScheduleAppointment,
    appointment_id=st.just(APPOINTMENT_ID),
    actor=anyone,
    patient_id=st.sampled_from(PATIENT_IDS),
    provider_id=st.sampled_from(PROVIDER_IDS),
    starts_at=starts_ats(),
    duration_minutes=durations,
    timezone=timezones,
    visit_reason=reasons,
)
cancels = st.builds(
    CancelAppointment, appointment_id=st.just(APPOINTMENT_ID), actor=actors, reason=reasons
)
starts = st.builds(StartAppointment, appointment_id=st.just(APPOINTMENT_ID), actor=actors)
# Starting needs the clock inside a narrow window: ask more often.
commands: st.SearchStrategy[Command] = weighted(
    (1, plausible_schedules), (1, hostile_schedules), (2, cancels), (3, starts)
)

clock_steps = weighted(
    (
        3,
        st.sampled_from(
            [timedelta(0), timedelta(microseconds=1), timedelta(minutes=5), timedelta(minutes=15)]
        ),
    ),
    (2, st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=1))),
    (1, st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2))),
)
rules = st.sampled_from(
    [Rules(), Rules(start_window=timedelta(0)), Rules(start_window=timedelta(hours=1))]
)
# Mostly opened by a booking that succeeds, so that what follows has something to act on.
histories = st.builds(
    lambda first, rest: [first, *rest],
    st.tuples(
        st.sampled_from([timedelta(0), timedelta(minutes=5)]),
        weighted((3, plausible_schedules), (1, commands)),
    ),
    st.lists(st.tuples(clock_steps, commands), max_size=14),
)


@dataclass(frozen=True)
class Step:
    state: State
    command: Command
    now: datetime
    events: list[Event]
    error: ClinicError | None


def run(rules: Rules, history: list[tuple[timedelta, Command]]) -> tuple[list[Step], list[Event]]:
    """Decide every command in turn on the folded state; only domain errors are expected."""
    now = BASE
    state: State = INITIAL
    stream: list[Event] = []
    steps: list[Step] = []
    for elapsed, command in history:
        now += elapsed
        try:
            events, error = decide(state, command, now, rules), None
        except ClinicError as refused:
            events, error = [], refused
        steps.append(Step(state, command, now, events, error))
        stream += events
        state = fold(events, state)
    record_statistic(f"ends {type(state).__name__}")
    return steps, stream


def assert_valid(state: State, stream: list[Event], rules: Rules) -> None:
    assert fold(stream) == state
    kinds = [type(event) for event in stream]
    match state:
        case NotScheduled():
            assert kinds == []
            return
        case Scheduled():
            assert kinds == [AppointmentScheduled]
        case Cancelled():
            assert kinds == [AppointmentScheduled, AppointmentCancelled]
            assert state.cancelled_at < state.booking.ends_at
        case Started():
            assert kinds == [AppointmentScheduled, AppointmentStarted]
            opens_at = start_window_opens_at(state.booking.starts_at, rules)
            assert opens_at <= state.started_at < state.booking.ends_at
    booking = state.booking
    assert booking.starts_at.utcoffset() is not None
    assert MIN_DURATION_MINUTES <= booking.duration_minutes <= MAX_DURATION_MINUTES
    assert is_valid_timezone(booking.timezone)
    assert booking.visit_reason is None or len(booking.visit_reason) <= MAX_TEXT_LENGTH
    assert {event.clinic_id for event in stream} == {booking.clinic_id}


@PROPERTY_SETTINGS
@given(rules=rules, history=histories)
def test_folded_state_is_always_valid(
    rules: Rules, history: list[tuple[timedelta, Command]]
) -> None:
    steps, stream = run(rules, history)

    seen: list[Event] = []
    for step in steps:
        assert_valid(step.state, seen, rules)
        seen += step.events
    assert_valid(fold(stream), stream, rules)


@PROPERTY_SETTINGS
@given(rules=rules, history=histories)
def test_no_command_after_a_terminal_event_produces_an_event(
    rules: Rules, history: list[tuple[timedelta, Command]]
) -> None:
    steps, _ = run(rules, history)

    for step in steps:
        if isinstance(step.state, Cancelled | Started):
            assert step.events == []


@PROPERTY_SETTINGS
@given(rules=rules, history=histories)
def test_decide_raises_nothing_but_domain_errors(
    rules: Rules, history: list[tuple[timedelta, Command]]
) -> None:
    # run() lets anything but a ClinicError escape, which fails the test.
    steps, _ = run(rules, history)

    for step in steps:
        assert step.error is None or step.error.code in ErrorCode


@PROPERTY_SETTINGS
@given(rules=rules, history=histories)
def test_a_stream_has_at_most_one_terminal_event(
    rules: Rules, history: list[tuple[timedelta, Command]]
) -> None:
    _, stream = run(rules, history)

    assert sum(isinstance(event, TERMINAL) for event in stream) <= 1
