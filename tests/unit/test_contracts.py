"""The wire contracts: what decoding refuses, and how old events are read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import msgspec
import pytest

from contracts.commands import (
    CancelBody,
    CancelRequest,
    GetRequest,
    ScheduleBody,
    ScheduleRequest,
    StartRequest,
    VisitsRequest,
)
from contracts.common import Actor, Principal
from contracts.errors import ERRORS, ErrorCode, problem
from contracts.events import (
    EVENT_KINDS,
    EVENT_TYPES,
    SCHEMA_VERSIONS,
    UPCASTERS,
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    UnknownEventType,
    decode_event,
    event_data,
    event_kind,
    event_type,
    upcast,
)
from services import errors as service_errors
from services.errors import ClinicError

CLINIC_ID = UUID(int=10)
PATIENT_ID = UUID(int=100)
PROVIDER_ID = UUID(int=200)
STAFF_ID = UUID(int=300)
APPOINTMENT_ID = UUID(int=1)

ACTOR = {"id": str(PATIENT_ID), "role": "patient", "clinic_id": str(CLINIC_ID)}
SCHEDULE_BODY: dict[str, Any] = {
    "patient_id": str(PATIENT_ID),
    "provider_id": str(PROVIDER_ID),
    "starts_at": "2030-06-01T10:00:00+02:00",
    "duration_minutes": 30,
    "timezone": "Europe/Paris",
    "visit_reason": "Follow-up",
}


def encode(value: dict[str, Any]) -> bytes:
    return msgspec.json.encode(value)


def refuses(type_: type, value: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(encode(value), type=type_)


# --- commands: what decoding accepts ----------------------------------------------------


def test_schedule_body_decodes_an_aware_starts_at() -> None:
    body = msgspec.json.decode(encode(SCHEDULE_BODY), type=ScheduleBody)

    assert body.starts_at == datetime(2030, 6, 1, 8, 0, tzinfo=UTC)
    assert body.starts_at.utcoffset() == timedelta(hours=2)
    assert body.appointment_id is None


def test_schedule_request_decodes_the_body_plus_the_actor() -> None:
    request = msgspec.json.decode(encode({**SCHEDULE_BODY, "actor": ACTOR}), type=ScheduleRequest)

    assert request.actor == Principal(id=PATIENT_ID, role="patient", clinic_id=CLINIC_ID)
    assert request.actor.actor == Actor(id=PATIENT_ID, role="patient")


@pytest.mark.parametrize("minutes", [5, 240])
def test_schedule_body_accepts_durations_from_5_to_240_minutes(minutes: int) -> None:
    body = msgspec.json.decode(
        encode({**SCHEDULE_BODY, "duration_minutes": minutes}), type=ScheduleBody
    )

    assert body.duration_minutes == minutes


def test_cancel_body_may_be_empty() -> None:
    assert msgspec.json.decode(b"{}", type=CancelBody) == CancelBody(reason=None)


@pytest.mark.parametrize("char", ["é", "😀", "e\u0301"])
def test_free_text_is_500_characters_whatever_their_bytes(char: str) -> None:
    reason = (char * 500)[:500]
    schedule = msgspec.json.decode(
        encode({**SCHEDULE_BODY, "visit_reason": reason}), type=ScheduleBody
    )
    cancel = msgspec.json.decode(encode({"reason": reason}), type=CancelBody)

    assert (schedule.visit_reason, cancel.reason) == (reason, reason)
    refuses(ScheduleBody, {**SCHEDULE_BODY, "visit_reason": reason + char[0]})
    refuses(CancelBody, {"reason": reason + char[0]})


# --- commands: what decoding refuses ----------------------------------------------------


@pytest.mark.parametrize("type_", [ScheduleBody, ScheduleRequest])
def test_schedule_with_a_naive_starts_at_is_refused(type_: type) -> None:
    refuses(type_, {**SCHEDULE_BODY, "actor": ACTOR, "starts_at": "2030-06-01T10:00:00"})


@pytest.mark.parametrize("minutes", [-1, 0, 4, 241])
def test_schedule_with_a_duration_out_of_range_is_refused(minutes: int) -> None:
    refuses(ScheduleBody, {**SCHEDULE_BODY, "duration_minutes": minutes})


def test_schedule_with_a_visit_reason_over_500_characters_is_refused() -> None:
    refuses(ScheduleBody, {**SCHEDULE_BODY, "visit_reason": "x" * 501})


def test_schedule_with_an_empty_timezone_is_refused() -> None:
    refuses(ScheduleBody, {**SCHEDULE_BODY, "timezone": ""})


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        (ScheduleBody, {**SCHEDULE_BODY, "clinic_id": str(CLINIC_ID)}),
        (ScheduleRequest, {**SCHEDULE_BODY, "actor": ACTOR, "role": "staff"}),
        (ScheduleRequest, {**SCHEDULE_BODY, "actor": {**ACTOR, "admin": True}}),
        (CancelBody, {"reason": "Busy", "force": True}),
        (CancelRequest, {"appointment_id": str(APPOINTMENT_ID), "actor": ACTOR, "x": 1}),
        (StartRequest, {"appointment_id": str(APPOINTMENT_ID), "actor": ACTOR, "x": 1}),
        (GetRequest, {"appointment_id": str(APPOINTMENT_ID), "actor": ACTOR, "x": 1}),
        (VisitsRequest, {"actor": ACTOR, "x": 1}),
    ],
    ids=[
        "schedule-body",
        "schedule-request",
        "principal",
        "cancel-body",
        "cancel-request",
        "start-request",
        "get-request",
        "visits-request",
    ],
)
def test_unknown_fields_are_refused(type_: type, value: dict[str, Any]) -> None:
    refuses(type_, value)


def test_cancel_reason_over_500_characters_is_refused() -> None:
    refuses(CancelBody, {"reason": "x" * 501})


def test_an_actor_with_an_unknown_role_is_refused() -> None:
    refuses(
        StartRequest, {"appointment_id": str(APPOINTMENT_ID), "actor": {**ACTOR, "role": "admin"}}
    )


def test_a_negative_expected_version_is_refused() -> None:
    refuses(
        CancelRequest,
        {"appointment_id": str(APPOINTMENT_ID), "actor": ACTOR, "expected_version": -1},
    )


@pytest.mark.parametrize("change", [{"limit": 0}, {"limit": 101}, {"tab": "later"}])
def test_visits_request_out_of_range_is_refused(change: dict[str, Any]) -> None:
    refuses(VisitsRequest, {"actor": ACTOR, **change})


# --- events: names, versions and upcasting ----------------------------------------------

SCHEDULED = AppointmentScheduled(
    clinic_id=CLINIC_ID,
    patient_id=PATIENT_ID,
    provider_id=PROVIDER_ID,
    starts_at=datetime(2030, 6, 1, 8, 0, tzinfo=UTC),
    duration_minutes=30,
    timezone="Europe/Paris",
    visit_reason="Follow-up",
    scheduled_by=Actor(id=STAFF_ID, role="staff"),
)
CANCELLED = AppointmentCancelled(
    clinic_id=CLINIC_ID,
    cancelled_by=Actor(id=PATIENT_ID, role="patient"),
    reason="Feeling better",
    cancelled_at=datetime(2030, 6, 1, 7, 0, tzinfo=UTC),
)
STARTED = AppointmentStarted(
    clinic_id=CLINIC_ID,
    started_by=Actor(id=PATIENT_ID, role="patient"),
    started_at=datetime(2030, 6, 1, 7, 50, tzinfo=UTC),
)


def test_scheduled_v1_without_visit_reason_is_upcast_to_the_current_struct() -> None:
    v1 = {
        "clinic_id": str(CLINIC_ID),
        "patient_id": str(PATIENT_ID),
        "provider_id": str(PROVIDER_ID),
        "starts_at": "2030-06-01T08:00:00Z",
        "duration_minutes": 30,
        "timezone": "Europe/Paris",
        "scheduled_by": {"id": str(STAFF_ID), "role": "staff"},
    }

    event = decode_event("AppointmentScheduled", 1, v1)

    assert event == msgspec.structs.replace(SCHEDULED, visit_reason=None)
    assert upcast("AppointmentScheduled", 1, v1)["visit_reason"] is None


def test_decoding_runs_each_upcaster_from_the_stored_version_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real v1 -> v2 step only adds a field's default, which decoding would add anyway:
    # an upcaster that changes what it is given shows whether decoding runs it.
    calls: list[dict[str, object]] = []

    def renaming(data: dict[str, Any]) -> dict[str, Any]:
        calls.append(data)
        return {**data, "visit_reason": f"from v1: {data.pop('reason_v1')}"}

    monkeypatch.setitem(UPCASTERS, ("AppointmentScheduled", 1), renaming)
    v1 = {**event_data(SCHEDULED), "reason_v1": "rash"}
    del v1["visit_reason"]

    assert decode_event("AppointmentScheduled", 1, v1).visit_reason == "from v1: rash"
    assert len(calls) == 1
    assert decode_event("AppointmentScheduled", 2, event_data(SCHEDULED)) == SCHEDULED
    assert len(calls) == 1  # data of the current version is read as it is


def test_scheduled_v1_is_upcast_from_raw_json_bytes_too() -> None:
    v1 = (
        b'{"clinic_id":"00000000-0000-0000-0000-00000000000a",'
        b'"patient_id":"00000000-0000-0000-0000-000000000064",'
        b'"provider_id":"00000000-0000-0000-0000-0000000000c8",'
        b'"starts_at":"2030-06-01T10:00:00+02:00","duration_minutes":30,'
        b'"timezone":"Europe/Paris",'
        b'"scheduled_by":{"id":"00000000-0000-0000-0000-00000000012c","role":"staff"}}'
    )

    event = decode_event("AppointmentScheduled", 1, v1)

    assert event == msgspec.structs.replace(SCHEDULED, visit_reason=None)


@pytest.mark.parametrize("event", [SCHEDULED, CANCELLED, STARTED], ids=lambda e: type(e).__name__)
def test_current_events_round_trip_through_their_data(event: Event) -> None:
    type_ = event_type(event)
    data = event_data(event)

    assert decode_event(type_, SCHEMA_VERSIONS[type_], data) == event
    assert decode_event(type_, SCHEMA_VERSIONS[type_], msgspec.json.encode(data)) == event


def test_event_data_is_json_ready() -> None:
    data = event_data(SCHEDULED)

    assert data["clinic_id"] == str(CLINIC_ID)
    assert data["starts_at"] == "2030-06-01T08:00:00Z"
    assert data["scheduled_by"] == {"id": str(STAFF_ID), "role": "staff"}


def test_every_old_schema_version_has_an_upcaster() -> None:
    for type_, current in SCHEMA_VERSIONS.items():
        for version in range(1, current):
            assert (type_, version) in UPCASTERS


def test_every_event_type_has_a_schema_version_and_a_kind() -> None:
    assert set(EVENT_TYPES) == set(SCHEMA_VERSIONS) == set(EVENT_KINDS)
    assert [event_kind(event_type(e)) for e in (SCHEDULED, CANCELLED, STARTED)] == [
        "scheduled",
        "cancelled",
        "started",
    ]


def test_unknown_event_type_is_reported_as_such() -> None:
    with pytest.raises(UnknownEventType):
        decode_event("AppointmentRescheduled", 1, {"clinic_id": str(CLINIC_ID)})
    with pytest.raises(UnknownEventType):
        decode_event("AppointmentRescheduled", 1, b"{}")
    with pytest.raises(UnknownEventType):
        upcast("AppointmentRescheduled", 1, {})
    with pytest.raises(UnknownEventType):
        event_kind("AppointmentRescheduled")


# --- errors: one stable code per error --------------------------------------------------


def test_every_error_code_has_an_http_status_and_title() -> None:
    assert set(ERRORS) == set(ErrorCode)


def test_every_domain_error_has_its_own_code() -> None:
    classes = [
        value
        for value in vars(service_errors).values()
        if isinstance(value, type) and issubclass(value, ClinicError) and value is not ClinicError
    ]

    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)) == len(ErrorCode)


def test_problem_says_when_the_start_window_opens_only_when_too_early() -> None:
    opens_at = datetime(2030, 6, 1, 7, 45, tzinfo=UTC)

    too_early = msgspec.json.decode(
        msgspec.json.encode(problem(ErrorCode.TOO_EARLY, "wait", opens_at=opens_at))
    )
    not_found = msgspec.json.decode(msgspec.json.encode(problem(ErrorCode.NOT_FOUND, "no")))

    assert too_early["opens_at"] == "2030-06-01T07:45:00Z"
    assert too_early["status"] == 409
    assert too_early["type"].endswith("/too-early")
    assert "opens_at" not in not_found
    assert not_found["status"] == 404


def test_every_problem_code_has_the_status_interfaces_md_gives_it() -> None:
    statuses = {code.value: status for code, (status, _) in ERRORS.items()}
    assert statuses == {
        "invalid-request": 400,
        "unauthenticated": 401,
        "forbidden": 403,
        "not-found": 404,
        "slot-taken": 409,
        "already-exists": 409,
        "appointment-started": 409,
        "appointment-past": 409,
        "appointment-cancelled": 409,
        "too-early": 409,
        "version-conflict": 412,
        "payload-too-large": 413,
        "idempotency-key-reused": 422,
        "unavailable": 503,
    }
    doc = problem(ErrorCode.SLOT_TAKEN, "taken")
    assert doc.type == "https://clinic.example/problems/slot-taken" and doc.status == 409
