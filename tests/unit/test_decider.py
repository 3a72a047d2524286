"""The appointment decider: given events, when a command at ``now``, then events or an error."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest

from contracts.common import Principal
from contracts.errors import ErrorCode
from contracts.events import AppointmentCancelled, AppointmentScheduled, AppointmentStarted, Event
from services.appointments.domain.commands import (
    CancelAppointment,
    Command,
    ScheduleAppointment,
    StartAppointment,
)
from services.appointments.domain.decider import _zone_names, decide, may_see
from services.appointments.domain.rules import Rules
from services.appointments.domain.state import CorruptStream, booking_of, fold
from services.appointments.domain.view import appointment_view
from services.errors import (
    AlreadyExists,
    AppointmentAlreadyStarted,
    AppointmentIsCancelled,
    AppointmentPast,
    ClinicError,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooEarly,
)

APPOINTMENT_ID = UUID(int=1)
CLINIC_ID = UUID(int=10)
OTHER_CLINIC_ID = UUID(int=11)

PATIENT = Principal(id=UUID(int=100), role="patient", clinic_id=CLINIC_ID)
OTHER_PATIENT = Principal(id=UUID(int=101), role="patient", clinic_id=CLINIC_ID)
PROVIDER = Principal(id=UUID(int=200), role="provider", clinic_id=CLINIC_ID)
OTHER_PROVIDER = Principal(id=UUID(int=201), role="provider", clinic_id=CLINIC_ID)
STAFF = Principal(id=UUID(int=300), role="staff", clinic_id=CLINIC_ID)
OTHER_STAFF = Principal(id=UUID(int=301), role="staff", clinic_id=CLINIC_ID)
OTHER_CLINIC_STAFF = Principal(id=UUID(int=302), role="staff", clinic_id=OTHER_CLINIC_ID)
#: The same people signed in to another clinic: still strangers to this appointment.
PATIENT_IN_OTHER_CLINIC = Principal(id=PATIENT.id, role="patient", clinic_id=OTHER_CLINIC_ID)
PROVIDER_IN_OTHER_CLINIC = Principal(id=PROVIDER.id, role="provider", clinic_id=OTHER_CLINIC_ID)

NOW = datetime(2030, 6, 1, 9, 0, tzinfo=UTC)
STARTS_AT = datetime(2030, 6, 1, 10, 0, tzinfo=UTC)
DURATION = 30
ENDS_AT = STARTS_AT + timedelta(minutes=DURATION)
WINDOW_OPENS_AT = STARTS_AT - timedelta(minutes=15)
TIMEZONE = "Europe/Paris"
MICROSECOND = timedelta(microseconds=1)

SEE_CANCEL_START_ALLOWED = [PATIENT, PROVIDER, STAFF, OTHER_STAFF]
SEE_CANCEL_START_NOT_FOUND = [
    OTHER_PATIENT,
    OTHER_PROVIDER,
    OTHER_CLINIC_STAFF,
    PATIENT_IN_OTHER_CLINIC,
    PROVIDER_IN_OTHER_CLINIC,
]


def _name(actor: Principal) -> str:
    clinic = "" if actor.clinic_id == CLINIC_ID else "@other-clinic"
    return f"{actor.role}-{actor.id.int}{clinic}"


def schedule(actor: Principal = STAFF, **changes: object) -> ScheduleAppointment:
    fields: dict[str, object] = {
        "appointment_id": APPOINTMENT_ID,
        "actor": actor,
        "patient_id": PATIENT.id,
        "provider_id": PROVIDER.id,
        "starts_at": STARTS_AT,
        "duration_minutes": DURATION,
        "timezone": TIMEZONE,
        "visit_reason": "Follow-up",
    }
    fields.update(changes)
    return ScheduleAppointment(**fields)  # type: ignore[arg-type]


def cancel(actor: Principal = PATIENT, reason: str | None = None) -> CancelAppointment:
    return CancelAppointment(appointment_id=APPOINTMENT_ID, actor=actor, reason=reason)


def start(actor: Principal = PATIENT) -> StartAppointment:
    return StartAppointment(appointment_id=APPOINTMENT_ID, actor=actor)


def scheduled(**changes: object) -> AppointmentScheduled:
    (event,) = decide(fold([]), schedule(**changes), NOW)
    assert isinstance(event, AppointmentScheduled)
    return event


def cancelled(at: datetime = NOW, by: Principal = PATIENT) -> AppointmentCancelled:
    return AppointmentCancelled(clinic_id=CLINIC_ID, cancelled_by=by.actor, cancelled_at=at)


def started(at: datetime = WINDOW_OPENS_AT, by: Principal = PATIENT) -> AppointmentStarted:
    return AppointmentStarted(clinic_id=CLINIC_ID, started_by=by.actor, started_at=at)


def when(
    given: list[Event], command: Command, now: datetime, rules: Rules | None = None
) -> list[Event]:
    state = fold(given)
    return decide(state, command, now) if rules is None else decide(state, command, now, rules)


def refused(
    given: list[Event],
    command: Command,
    now: datetime,
    error: type[ClinicError],
    rules: Rules | None = None,
) -> ClinicError:
    with pytest.raises(error) as caught:
        when(given, command, now, rules)
    return caught.value


# --- ScheduleAppointment: who may book --------------------------------------------------


def test_staff_schedules_for_anyone_in_their_clinic() -> None:
    events = when([], schedule(STAFF), NOW)

    assert events == [
        AppointmentScheduled(
            clinic_id=CLINIC_ID,
            patient_id=PATIENT.id,
            provider_id=PROVIDER.id,
            starts_at=STARTS_AT,
            duration_minutes=DURATION,
            timezone=TIMEZONE,
            visit_reason="Follow-up",
            scheduled_by=STAFF.actor,
        )
    ]


def test_scheduled_appointment_belongs_to_the_actors_clinic() -> None:
    (event,) = when([], schedule(OTHER_CLINIC_STAFF), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.clinic_id == OTHER_CLINIC_ID


def test_patient_schedules_for_themselves() -> None:
    (event,) = when([], schedule(PATIENT), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.patient_id == PATIENT.id
    assert event.scheduled_by == PATIENT.actor


def test_patient_scheduling_for_another_patient_is_forbidden() -> None:
    refused([], schedule(PATIENT, patient_id=OTHER_PATIENT.id), NOW, Forbidden)


def test_provider_schedules_visits_they_hold() -> None:
    (event,) = when([], schedule(PROVIDER), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.provider_id == PROVIDER.id
    assert event.scheduled_by == PROVIDER.actor


def test_provider_scheduling_for_another_provider_is_forbidden() -> None:
    refused([], schedule(PROVIDER, provider_id=OTHER_PROVIDER.id), NOW, Forbidden)


# --- ScheduleAppointment: validation ----------------------------------------------------


def test_schedule_with_naive_starts_at_is_invalid() -> None:
    refused([], schedule(starts_at=STARTS_AT.replace(tzinfo=None)), NOW, InvalidRequest)


@pytest.mark.parametrize("moment", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00+05:00"])
def test_schedule_at_a_time_with_no_utc_equivalent_is_invalid(moment: str) -> None:
    refused([], schedule(starts_at=datetime.fromisoformat(moment)), NOW, InvalidRequest)


def test_schedule_accepts_any_utc_offset() -> None:
    paris_summer = timezone(timedelta(hours=2))

    (event,) = when([], schedule(starts_at=STARTS_AT.astimezone(paris_summer)), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.starts_at == STARTS_AT


def test_scheduled_event_records_starts_at_in_utc() -> None:
    # domain.md: AppointmentScheduled carries starts_at (UTC).
    paris_summer = timezone(timedelta(hours=2))

    (event,) = when([], schedule(starts_at=STARTS_AT.astimezone(paris_summer)), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.starts_at.utcoffset() == timedelta(0)


def test_duration_is_elapsed_time_even_across_a_dst_change() -> None:
    # 01:30 EDT on the night New York falls back: a 60 minute visit ends at 06:30 UTC,
    # not at 02:30 EST (07:30 UTC) as wall-clock arithmetic would make it.
    starts_at = datetime(2030, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York"))
    now = datetime(2030, 11, 3, 0, 0, tzinfo=UTC)
    real_end = datetime(2030, 11, 3, 6, 30, tzinfo=UTC)
    command = schedule(starts_at=starts_at, duration_minutes=60, timezone="America/New_York")
    given = when([], command, now)

    refused(given, start(), real_end, AppointmentPast)


def test_schedule_in_the_past_is_invalid() -> None:
    refused([], schedule(starts_at=NOW - MICROSECOND), NOW, InvalidRequest)


def test_schedule_starting_right_now_is_invalid() -> None:
    refused([], schedule(starts_at=NOW), NOW, InvalidRequest)


def test_schedule_one_microsecond_ahead_is_allowed() -> None:
    assert len(when([], schedule(starts_at=NOW + MICROSECOND), NOW)) == 1


def test_schedule_exactly_365_days_ahead_is_allowed() -> None:
    assert len(when([], schedule(starts_at=NOW + timedelta(days=365)), NOW)) == 1


def test_schedule_more_than_365_days_ahead_is_invalid() -> None:
    too_far = NOW + timedelta(days=365) + MICROSECOND

    refused([], schedule(starts_at=too_far), NOW, InvalidRequest)


@pytest.mark.parametrize("minutes", [5, 240])
def test_schedule_duration_from_5_to_240_minutes_is_allowed(minutes: int) -> None:
    (event,) = when([], schedule(duration_minutes=minutes), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.duration_minutes == minutes


@pytest.mark.parametrize("minutes", [-5, 0, 4, 241])
def test_schedule_duration_outside_5_to_240_minutes_is_invalid(minutes: int) -> None:
    refused([], schedule(duration_minutes=minutes), NOW, InvalidRequest)


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires"])
def test_schedule_with_an_iana_timezone_is_allowed(name: str) -> None:
    assert len(when([], schedule(timezone=name), NOW)) == 1


@pytest.mark.parametrize("name", ["US/Eastern", "Asia/Calcutta", "Europe/Kiev", "EST5EDT"])
def test_backward_zone_names_are_known_without_the_hosts_tz_database(name: str) -> None:
    """Phones still send the tz database's backward names, which Debian 13 moved out of
    its slim images: the tzdata package knows them wherever the host does not."""
    zoneinfo.reset_tzpath(to=[])  # no tz database of the host's at all
    _zone_names.cache_clear()
    ZoneInfo.clear_cache()
    try:
        assert len(when([], schedule(timezone=name), NOW)) == 1
        assert ZoneInfo(name).utcoffset(NOW) is not None
    finally:
        zoneinfo.reset_tzpath()
        _zone_names.cache_clear()
        ZoneInfo.clear_cache()


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus_Mons",
        "",
        "europe/paris",
        "America",
        "../etc/passwd",
        "/etc/passwd",
        # Files of the tz database that are not zone names: the host's zone, the copies
        # with leap seconds or POSIX rules, and the POSIX default.
        "localtime",
        "right/UTC",
        "posix/Europe/Paris",
        "posixrules",
        "Factory",  # the placeholder of a system whose zone is not set
    ],
)
def test_schedule_with_an_unknown_timezone_is_invalid(name: str) -> None:
    refused([], schedule(timezone=name), NOW, InvalidRequest)


@pytest.mark.parametrize("reason", [None, "", "x" * 500])
def test_schedule_visit_reason_up_to_500_characters_is_allowed(reason: str | None) -> None:
    (event,) = when([], schedule(visit_reason=reason), NOW)

    assert isinstance(event, AppointmentScheduled)
    assert event.visit_reason == reason


def test_schedule_visit_reason_over_500_characters_is_invalid() -> None:
    refused([], schedule(visit_reason="x" * 501), NOW, InvalidRequest)


#: Characters beyond ASCII: two and four bytes in UTF-8, and one of two code points (an
#: "e" and a combining accent). The limit counts code points, as Python and JSON Schema do.
WIDE_CHARACTERS = ["é", "😀", "e\u0301"]


@pytest.mark.parametrize("char", WIDE_CHARACTERS)
def test_visit_and_cancel_reasons_count_characters_not_bytes(char: str) -> None:
    reason = (char * 500)[:500]
    (event,) = when([], schedule(visit_reason=reason), NOW)
    assert isinstance(event, AppointmentScheduled)
    assert event.visit_reason == reason
    (cancelled,) = when([scheduled()], cancel(reason=reason), NOW)
    assert isinstance(cancelled, AppointmentCancelled)
    assert cancelled.reason == reason

    refused([], schedule(visit_reason=reason + char[0]), NOW, InvalidRequest)
    refused([scheduled()], cancel(reason=reason + char[0]), NOW, InvalidRequest)


# --- ScheduleAppointment: the same id twice ---------------------------------------------


def test_exact_schedule_retry_produces_no_events() -> None:
    assert when([scheduled()], schedule(), NOW + timedelta(seconds=5)) == []


def test_exact_schedule_retry_after_the_start_time_still_produces_no_events() -> None:
    # A retry is answered by what happened, not re-validated against a later clock.
    assert when([scheduled()], schedule(), ENDS_AT + timedelta(days=1)) == []


def test_exact_schedule_retry_of_a_cancelled_appointment_produces_no_events() -> None:
    assert when([scheduled(), cancelled()], schedule(), NOW) == []


def test_schedule_retry_with_the_same_instant_in_another_offset_is_exact() -> None:
    same_instant = STARTS_AT.astimezone(timezone(timedelta(hours=-5)))

    assert when([scheduled()], schedule(starts_at=same_instant), NOW) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"starts_at": STARTS_AT + timedelta(minutes=30)},
        {"duration_minutes": DURATION + 5},
        {"timezone": "Europe/Berlin"},
        {"visit_reason": "Something else"},
        {"visit_reason": None},
        {"provider_id": OTHER_PROVIDER.id},
        {"patient_id": OTHER_PATIENT.id},
        {"actor": OTHER_STAFF},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_schedule_same_id_with_a_different_body_already_exists(
    changes: dict[str, object],
) -> None:
    refused([scheduled()], schedule(**changes), NOW, AlreadyExists)


def test_schedule_over_another_clinics_appointment_id_already_exists() -> None:
    error = refused([scheduled()], schedule(OTHER_CLINIC_STAFF), NOW, AlreadyExists)

    assert error.code is ErrorCode.ALREADY_EXISTS


# --- Who may see an appointment (and so cancel or start it) -----------------------------


@pytest.mark.parametrize("actor", SEE_CANCEL_START_ALLOWED, ids=_name)
def test_owner_holder_and_clinic_staff_may_see_the_appointment(actor: Principal) -> None:
    booking = booking_of(fold([scheduled()]))

    assert booking is not None
    assert may_see(actor, booking)


@pytest.mark.parametrize("actor", SEE_CANCEL_START_NOT_FOUND, ids=_name)
def test_other_patients_providers_and_clinics_may_not_see_the_appointment(
    actor: Principal,
) -> None:
    booking = booking_of(fold([scheduled()]))

    assert booking is not None
    assert not may_see(actor, booking)


# --- CancelAppointment ------------------------------------------------------------------


@pytest.mark.parametrize("actor", SEE_CANCEL_START_ALLOWED, ids=_name)
def test_cancel_by_owner_holder_or_clinic_staff_is_allowed(actor: Principal) -> None:
    events = when([scheduled()], cancel(actor, reason="Feeling better"), NOW)

    assert events == [
        AppointmentCancelled(
            clinic_id=CLINIC_ID,
            cancelled_by=actor.actor,
            reason="Feeling better",
            cancelled_at=NOW,
        )
    ]


@pytest.mark.parametrize("actor", SEE_CANCEL_START_NOT_FOUND, ids=_name)
def test_cancel_by_someone_who_may_not_see_the_appointment_is_not_found(
    actor: Principal,
) -> None:
    refused([scheduled()], cancel(actor), NOW, NotFound)


def test_cancel_of_an_unknown_appointment_is_not_found() -> None:
    refused([], cancel(STAFF), NOW, NotFound)


def test_another_clinics_appointment_is_indistinguishable_from_a_missing_one() -> None:
    hidden = refused([scheduled()], cancel(OTHER_CLINIC_STAFF), NOW, NotFound)
    missing = refused([], cancel(OTHER_CLINIC_STAFF), NOW, NotFound)

    assert hidden.to_problem() == missing.to_problem()


def test_cancel_without_a_reason_is_allowed() -> None:
    (event,) = when([scheduled()], cancel(), NOW)

    assert isinstance(event, AppointmentCancelled)
    assert event.reason is None


def test_cancel_reason_of_500_characters_is_allowed() -> None:
    (event,) = when([scheduled()], cancel(reason="x" * 500), NOW)

    assert isinstance(event, AppointmentCancelled)
    assert event.reason == "x" * 500


def test_cancel_reason_over_500_characters_is_invalid() -> None:
    refused([scheduled()], cancel(reason="x" * 501), NOW, InvalidRequest)


def test_cancel_after_starts_at_until_the_end_is_allowed() -> None:
    assert len(when([scheduled()], cancel(), STARTS_AT)) == 1
    assert len(when([scheduled()], cancel(), ENDS_AT - MICROSECOND)) == 1


def test_cancel_at_the_end_is_refused_as_past() -> None:
    refused([scheduled()], cancel(), ENDS_AT, AppointmentPast)


def test_cancel_after_the_end_without_a_start_is_refused_as_past() -> None:
    refused([scheduled()], cancel(), ENDS_AT + timedelta(days=3), AppointmentPast)


def test_cancel_after_start_is_refused() -> None:
    refused([scheduled(), started()], cancel(), STARTS_AT, AppointmentAlreadyStarted)


def test_cancel_after_start_and_end_is_refused_as_started() -> None:
    refused(
        [scheduled(), started()], cancel(), ENDS_AT + timedelta(hours=1), AppointmentAlreadyStarted
    )


def test_double_cancel_produces_no_events() -> None:
    assert when([scheduled(), cancelled()], cancel(), NOW + timedelta(seconds=1)) == []


def test_double_cancel_by_another_allowed_actor_produces_no_events() -> None:
    assert when([scheduled(), cancelled(by=PATIENT)], cancel(STAFF), NOW) == []


def test_double_cancel_after_the_end_produces_no_events() -> None:
    assert when([scheduled(), cancelled()], cancel(), ENDS_AT + timedelta(days=1)) == []


def test_cancel_of_another_clinics_cancelled_appointment_is_not_found() -> None:
    refused([scheduled(), cancelled()], cancel(OTHER_CLINIC_STAFF), NOW, NotFound)


# --- StartAppointment -------------------------------------------------------------------


@pytest.mark.parametrize("actor", SEE_CANCEL_START_ALLOWED, ids=_name)
def test_start_by_owner_holder_or_clinic_staff_is_allowed(actor: Principal) -> None:
    events = when([scheduled()], start(actor), STARTS_AT)

    assert events == [
        AppointmentStarted(clinic_id=CLINIC_ID, started_by=actor.actor, started_at=STARTS_AT)
    ]


@pytest.mark.parametrize("actor", SEE_CANCEL_START_NOT_FOUND, ids=_name)
def test_start_by_someone_who_may_not_see_the_appointment_is_not_found(
    actor: Principal,
) -> None:
    refused([scheduled()], start(actor), STARTS_AT, NotFound)


def test_start_of_an_unknown_appointment_is_not_found() -> None:
    refused([], start(STAFF), STARTS_AT, NotFound)


def test_start_exactly_when_the_window_opens_is_allowed() -> None:
    events = when([scheduled()], start(), STARTS_AT - timedelta(minutes=15))

    assert events == [
        AppointmentStarted(
            clinic_id=CLINIC_ID, started_by=PATIENT.actor, started_at=WINDOW_OPENS_AT
        )
    ]


def test_start_one_microsecond_before_the_window_is_too_early() -> None:
    error = refused([scheduled()], start(), WINDOW_OPENS_AT - MICROSECOND, TooEarly)

    assert isinstance(error, TooEarly)
    assert error.opens_at == STARTS_AT - timedelta(minutes=15)
    assert error.code is ErrorCode.TOO_EARLY


def test_too_early_problem_says_when_the_window_opens() -> None:
    error = refused([scheduled()], start(), NOW, TooEarly)

    problem = error.to_problem()
    assert problem.code is ErrorCode.TOO_EARLY
    assert problem.opens_at == WINDOW_OPENS_AT


def test_start_one_microsecond_before_the_end_is_allowed() -> None:
    assert len(when([scheduled()], start(), ENDS_AT - MICROSECOND)) == 1


def test_start_at_the_end_is_refused_as_past() -> None:
    refused([scheduled()], start(), ENDS_AT, AppointmentPast)


def test_start_of_a_cancelled_appointment_is_refused() -> None:
    refused([scheduled(), cancelled()], start(), STARTS_AT, AppointmentIsCancelled)


def test_double_start_produces_no_events() -> None:
    given = [scheduled(), started(at=STARTS_AT)]

    assert when(given, start(), STARTS_AT + timedelta(minutes=1)) == []


def test_double_start_by_another_allowed_actor_produces_no_events() -> None:
    assert when([scheduled(), started(by=PATIENT)], start(PROVIDER), STARTS_AT) == []


def test_double_start_until_the_end_produces_no_events_and_after_it_is_past() -> None:
    assert when([scheduled(), started()], start(), ENDS_AT - MICROSECOND) == []
    refused([scheduled(), started()], start(), ENDS_AT, AppointmentPast)
    refused([scheduled(), started()], start(), ENDS_AT + timedelta(hours=1), AppointmentPast)


def test_start_of_another_clinics_started_appointment_is_not_found() -> None:
    refused([scheduled(), started()], start(OTHER_CLINIC_STAFF), STARTS_AT, NotFound)


@pytest.mark.parametrize("minutes", [0, 5, 30, 60])
def test_start_window_is_configurable(minutes: int) -> None:
    rules = Rules(start_window=timedelta(minutes=minutes))
    opens_at = STARTS_AT - timedelta(minutes=minutes)

    error = refused([scheduled()], start(), opens_at - MICROSECOND, TooEarly, rules)
    assert isinstance(error, TooEarly)
    assert error.opens_at == opens_at
    assert len(when([scheduled()], start(), opens_at, rules)) == 1


def test_start_window_defaults_to_15_minutes() -> None:
    refused([scheduled()], start(), WINDOW_OPENS_AT - MICROSECOND, TooEarly, Rules())
    assert len(when([scheduled()], start(), WINDOW_OPENS_AT, Rules())) == 1


# --- Gaps found by mutation testing ------------------------------------------------------


def test_the_same_booking_from_another_clinic_is_not_a_retry_of_it() -> None:
    # The same user id and body in another clinic is another person's booking.
    same_user_elsewhere = Principal(id=STAFF.id, role="staff", clinic_id=OTHER_CLINIC_ID)
    refused([scheduled()], schedule(same_user_elsewhere), NOW, AlreadyExists)
    assert when([scheduled()], schedule(STAFF), NOW) == []  # the retry itself


@pytest.mark.parametrize("command", [schedule(visit_reason="a\x00b"), cancel(reason="a\x00b")])
def test_text_with_a_nul_character_is_invalid(command: Command) -> None:
    given = [] if isinstance(command, ScheduleAppointment) else [scheduled()]
    refused(given, command, NOW, InvalidRequest)


@pytest.mark.parametrize(
    "events",
    [
        [AppointmentCancelled(clinic_id=CLINIC_ID, cancelled_by=PATIENT.actor, cancelled_at=NOW)],
        "scheduled,started,cancelled",
        "scheduled,cancelled,started",
        "scheduled,scheduled",
    ],
)
def test_a_stream_no_command_could_have_written_is_corrupt(events: object) -> None:
    makers = {"scheduled": scheduled, "started": started, "cancelled": cancelled}
    given = events if isinstance(events, list) else [makers[n]() for n in str(events).split(",")]
    with pytest.raises(CorruptStream):
        fold(given)


def test_the_cancellation_reason_is_kept_in_the_state_and_shown() -> None:
    reasoned = AppointmentCancelled(
        clinic_id=CLINIC_ID, cancelled_by=PATIENT.actor, cancelled_at=NOW, reason="Feeling better"
    )
    view = appointment_view(APPOINTMENT_ID, fold([scheduled(), reasoned]), 2, NOW, Rules())
    assert view.cancellation_reason == "Feeling better"
