"""The pure parts of the visits read model: folding events into rows, cursors, scopes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import msgspec
import pytest

from contracts.common import Actor, Principal
from contracts.events import (
    AppointmentCancelled,
    AppointmentScheduled,
    AppointmentStarted,
    Event,
    EventEnvelope,
    event_data,
    event_type,
)
from services.appointments.adapters.postgres.errors import passing_refusal
from services.appointments.service_layer.visits import (
    Outcome,
    PageKey,
    Scope,
    decode_cursor,
    encode_cursor,
    project,
)
from services.errors import InvalidRequest

NOW = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
STREAM = uuid.UUID("5f0c2a52-7a43-4b7e-9d7e-1f6f3c1b2a10")
CLINIC = uuid.uuid4()
STAFF = Actor(id=uuid.uuid4(), role="staff")
BOOKED = AppointmentScheduled(
    clinic_id=CLINIC,
    patient_id=uuid.uuid4(),
    provider_id=uuid.uuid4(),
    starts_at=datetime(2030, 1, 2, 10, 0, tzinfo=UTC) + timedelta(hours=1),
    duration_minutes=20,
    timezone="Europe/Paris",
    visit_reason="rash",
    scheduled_by=STAFF,
)
CANCELLED = AppointmentCancelled(clinic_id=CLINIC, cancelled_by=STAFF, cancelled_at=NOW)
STARTED = AppointmentStarted(clinic_id=CLINIC, started_by=STAFF, started_at=NOW)


def envelope(
    version: int, type_: str, data: dict[str, Any], schema_version: int = 1
) -> EventEnvelope:
    return EventEnvelope(
        event_id=uuid.uuid4(),
        type=type_,
        schema_version=schema_version,
        stream_id=STREAM,
        stream_version=version,
        global_position=version,
        occurred_at=NOW,
        data=data,
    )


def of(version: int, event: Event) -> EventEnvelope:
    type_ = event_type(event)
    return envelope(version, type_, event_data(event), 2 if type_ == "AppointmentScheduled" else 1)


def test_scheduling_creates_the_row_with_what_the_read_side_needs() -> None:
    outcome, row = project(None, of(1, BOOKED))
    assert outcome is Outcome.APPLIED and row is not None
    assert (row.appointment_id, row.clinic_id, row.status, row.version) == (
        STREAM,
        CLINIC,
        "scheduled",
        1,
    )
    assert row.ends_at - row.starts_at == timedelta(minutes=20)
    assert (row.timezone, row.visit_reason) == ("Europe/Paris", "rash")


@pytest.mark.parametrize(("event", "status"), [(CANCELLED, "cancelled"), (STARTED, "started")])
def test_a_terminal_event_sets_the_status_and_version(event: Event, status: str) -> None:
    _, row = project(None, of(1, BOOKED))
    outcome, after = project(row, of(2, event))
    assert outcome is Outcome.APPLIED and after is not None
    assert (after.status, after.version) == (status, 2)


def test_an_event_already_reflected_is_a_duplicate_and_changes_nothing() -> None:
    _, row = project(None, of(1, BOOKED))
    _, row = project(row, of(2, CANCELLED))
    assert project(row, of(2, CANCELLED)) == (Outcome.DUPLICATE, row)
    assert project(row, of(1, BOOKED)) == (Outcome.DUPLICATE, row)


def test_an_event_after_a_missing_one_is_a_gap() -> None:
    assert project(None, of(2, CANCELLED)) == (Outcome.GAP, None)
    _, row = project(None, of(1, BOOKED))
    assert project(row, of(3, STARTED)) == (Outcome.GAP, row)


def test_an_unknown_type_moves_the_version_and_nothing_else() -> None:
    _, row = project(None, of(1, BOOKED))
    outcome, after = project(row, envelope(2, "AppointmentRescheduled", {"whatever": True}))
    assert outcome is Outcome.SKIPPED and after == msgspec.structs.replace(row, version=2)
    assert project(None, envelope(1, "SomethingNew", {})) == (Outcome.SKIPPED, None)


def test_old_schema_versions_are_upcast() -> None:
    data = event_data(BOOKED)
    del data["visit_reason"]
    outcome, row = project(None, envelope(1, "AppointmentScheduled", data, schema_version=1))
    assert outcome is Outcome.APPLIED and row is not None and row.visit_reason is None


@pytest.mark.parametrize(
    "bad",
    [
        envelope(1, "AppointmentScheduled", {"clinic_id": "not a uuid"}, 2),
        envelope(1, "AppointmentCancelled", event_data(CANCELLED)),  # cancels nothing
    ],
)
def test_unreadable_or_impossible_events_are_poison(bad: EventEnvelope) -> None:
    assert project(None, bad) == (Outcome.POISON, None)


def _booked(**changes: Any) -> EventEnvelope:
    return envelope(1, "AppointmentScheduled", {**event_data(BOOKED), **changes}, 2)


@pytest.mark.parametrize(
    "bad",
    [
        _booked(starts_at="9999-12-31T23:59:00+00:00"),  # ends after year 9999
        _booked(starts_at="0001-01-01T00:30:00+05:00"),  # no UTC time
        _booked(duration_minutes=10**15),  # overflows a date
        _booked(duration_minutes=3_000_000_000),  # no int column holds it
        _booked(duration_minutes=241),  # longer than the Upcoming range allows for
        _booked(duration_minutes=0),
        _booked(starts_at="2030-01-02T10:00:00"),  # no offset: no instant
    ],
    ids=["year-9999", "year-1", "overflow", "int32", "too-long", "zero", "naive"],
)
def test_events_the_view_cannot_hold_are_poison(bad: EventEnvelope) -> None:
    assert project(None, bad) == (Outcome.POISON, None)


def test_an_envelope_with_a_naive_time_is_not_decoded() -> None:
    wire = msgspec.json.encode(of(1, BOOKED)).replace(b'Z"', b'"')
    assert b'"occurred_at":"2030-01-01T09:00:00"' in wire
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        msgspec.json.decode(wire, type=EventEnvelope)


def test_a_second_scheduling_is_poison() -> None:
    _, row = project(None, of(1, BOOKED))
    assert project(row, of(2, BOOKED)) == (Outcome.POISON, row)


def test_a_cursor_round_trips_and_belongs_to_its_tab() -> None:
    key = PageKey("past", NOW, STREAM)
    cursor = encode_cursor(key)
    assert decode_cursor(cursor, "past") == key
    assert "=" not in cursor
    with pytest.raises(InvalidRequest):
        decode_cursor(cursor, "upcoming")


@pytest.mark.parametrize(
    "cursor", ["", "!!!", "bnVsbA", encode_cursor(PageKey("past", NOW, STREAM))[:-4]]
)
def test_a_cursor_not_issued_here_is_an_invalid_request(cursor: str) -> None:
    with pytest.raises(InvalidRequest):
        decode_cursor(cursor, "past")


def test_a_naive_time_in_a_cursor_is_refused() -> None:
    forged = encode_cursor(PageKey("past", NOW.replace(tzinfo=None), STREAM))
    with pytest.raises(InvalidRequest):
        decode_cursor(forged, "past")


@pytest.mark.parametrize("moment", ["9999-12-31T23:59:59-10:00", "0001-01-01T00:00:00+10:00"])
def test_a_time_in_a_cursor_with_no_utc_equivalent_is_refused(moment: str) -> None:
    # PostgreSQL would refuse it as a query argument (a 503): refused as input instead.
    forged = encode_cursor(PageKey("past", datetime.fromisoformat(moment), STREAM))
    with pytest.raises(InvalidRequest):
        decode_cursor(forged, "past")


def test_a_cursor_time_is_read_in_utc() -> None:
    key = decode_cursor(
        encode_cursor(PageKey("past", NOW.astimezone(timezone(timedelta(hours=-1))), STREAM)),
        "past",
    )
    assert key == PageKey("past", NOW, STREAM)
    assert key.starts_at.utcoffset() == timedelta(0)


def test_each_role_gets_its_scope() -> None:
    me = uuid.uuid4()
    assert Scope.of(Principal(id=me, role="patient", clinic_id=CLINIC)) == Scope(
        clinic_id=CLINIC, patient_id=me
    )
    assert Scope.of(Principal(id=me, role="provider", clinic_id=CLINIC)) == Scope(
        clinic_id=CLINIC, provider_id=me
    )
    assert Scope.of(Principal(id=me, role="staff", clinic_id=CLINIC)) == Scope(clinic_id=CLINIC)


@pytest.mark.parametrize(
    ("error", "passes"),
    [
        (asyncpg.exceptions.ReadOnlySQLTransactionError, True),  # a failover's standby
        (asyncpg.exceptions.DiskFullError, True),
        (asyncpg.exceptions.DeadlockDetectedError, True),
        (asyncpg.exceptions.SerializationError, True),
        (asyncpg.exceptions.QueryCanceledError, True),
        (asyncpg.exceptions.LockNotAvailableError, True),
        (asyncpg.exceptions.CheckViolationError, False),  # what the rows hold
        (asyncpg.exceptions.NumericValueOutOfRangeError, False),
        (asyncpg.exceptions.UndefinedTableError, False),
        (asyncpg.exceptions.UndefinedFileError, False),  # a missing file stays missing
    ],
)
def test_refusals_that_pass_are_told_from_those_of_content(
    error: type[asyncpg.PostgresError], passes: bool
) -> None:
    assert passing_refusal(error("refused")) is passes
    assert not passing_refusal(ValueError("not PostgreSQL's"))


@pytest.mark.parametrize("minutes", [5, 240])
def test_the_longest_and_shortest_visits_are_listed(minutes: int) -> None:
    outcome, row = project(None, _booked(duration_minutes=minutes))
    assert outcome is Outcome.APPLIED and row is not None and row.duration_minutes == minutes
