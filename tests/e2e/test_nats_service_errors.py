"""Error replies of the NATS service API: malformed requests, tenancy, every domain conflict.

Each error reply carries ``Nats-Service-Error``/``Nats-Service-Error-Code`` (the HTTP
status) and the problem document; none silences or breaks the subscription.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from contracts.common import ROLES
from contracts.subjects import CMD_CANCEL, CMD_SCHEDULE, CMD_START, QUERY_GET, QUERY_VISITS
from tests.e2e.nats_support import NatsService, assert_ok, assert_problem, running_service


@pytest.fixture
async def service(database_url: str, nats_url: str) -> AsyncIterator[NatsService]:
    async with running_service(database_url, nats_url) as running:
        yield running


async def scheduled(service: NatsService, actor: dict[str, str], **changes: Any) -> dict[str, Any]:
    return assert_ok(await service.request(CMD_SCHEDULE, service.schedule_body(actor, **changes)))


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != name}


BAD_REQUESTS: list[tuple[str, str, Any]] = [
    ("malformed json", CMD_SCHEDULE, b'{"patient_id": '),
    ("not an object", CMD_CANCEL, b"[1, 2]"),
    ("empty body", QUERY_VISITS, b""),
    ("missing actor", CMD_CANCEL, {"appointment_id": str(uuid.uuid4())}),
    ("actor not an object", QUERY_GET, {"appointment_id": str(uuid.uuid4()), "actor": "x"}),
    ("unknown field", QUERY_VISITS, "unknown"),
    ("invalid uuid", QUERY_GET, "bad-uuid"),
    ("unknown role", QUERY_VISITS, "bad-role"),
]


@pytest.mark.parametrize(
    ("case", "subject", "body"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_malformed_requests_get_invalid_request(
    service: NatsService, case: str, subject: str, body: Any
) -> None:
    actor = service.actor("staff")
    if body == "unknown":
        body = {"actor": actor, "tab": "upcoming", "shoe_size": 44}
    elif body == "bad-uuid":
        body = {"appointment_id": "not-a-uuid", "actor": actor}
    elif body == "bad-role":
        body = {"actor": {**actor, "role": "admin"}}
    doc = assert_problem(await service.request(subject, body), 400, "invalid-request")
    if case == "missing actor":
        assert "actor" in doc["detail"]


async def test_schedule_body_errors_are_invalid_requests(service: NatsService) -> None:
    patient = service.actor("patient")
    past = (service.clock.now - timedelta(minutes=1)).isoformat()
    naive = (service.clock.now + timedelta(hours=2)).replace(tzinfo=None).isoformat()
    for changes in (
        {"starts_at": past},
        {"starts_at": naive},
        {"duration_minutes": "30"},
        {"duration_minutes": 3},
        {"timezone": "Mars/Olympus_Mons"},
        {"visit_reason": "x" * 501},
    ):
        reply = await service.request(CMD_SCHEDULE, service.schedule_body(patient, **changes))
        assert_problem(reply, 400, "invalid-request")
    body = without(service.schedule_body(patient), "patient_id")
    assert_problem(await service.request(CMD_SCHEDULE, body), 400, "invalid-request")


async def test_an_oversized_request_gets_payload_too_large(service: NatsService) -> None:
    body = service.schedule_body(service.actor("patient"), visit_reason="x" * (65 * 1024))
    assert_problem(await service.request(CMD_SCHEDULE, body), 413, "payload-too-large")


async def test_the_service_keeps_answering_after_bad_requests(service: NatsService) -> None:
    for _ in range(3):
        assert_problem(await service.request(QUERY_GET, b"\xff\xfe"), 400, "invalid-request")
    patient = service.actor("patient")
    assert (await scheduled(service, patient))["status"] == "scheduled"


async def test_another_clinics_appointment_is_not_found(service: NatsService) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    for role in ROLES:
        outsider = service.actor(role, clinic_id=uuid.uuid4())
        key = {"appointment_id": view["appointment_id"], "actor": outsider}
        assert_problem(await service.request(QUERY_GET, key), 404, "not-found")
        assert_problem(await service.request(CMD_CANCEL, key), 404, "not-found")
        assert_problem(await service.request(CMD_START, key), 404, "not-found")
    # The same patient id in another clinic is another person too.
    alias = service.actor("patient", clinic_id=uuid.uuid4(), id=uuid.UUID(patient["id"]))
    key = {"appointment_id": view["appointment_id"], "actor": alias}
    assert_problem(await service.request(QUERY_GET, key), 404, "not-found")


async def test_another_patients_appointment_is_not_found(service: NatsService) -> None:
    view = await scheduled(service, service.actor("patient"))
    key = {"appointment_id": view["appointment_id"], "actor": service.actor("patient")}
    assert_problem(await service.request(QUERY_GET, key), 404, "not-found")
    assert_problem(
        await service.request(CMD_CANCEL, {**key, "expected_version": 1}), 404, "not-found"
    )


async def test_a_patient_scheduling_for_someone_else_is_forbidden(service: NatsService) -> None:
    patient = service.actor("patient")
    body = service.schedule_body(patient, patient_id=str(uuid.uuid4()))
    assert_problem(await service.request(CMD_SCHEDULE, body), 403, "forbidden")


async def test_a_booked_slot_of_the_provider_is_slot_taken(service: NatsService) -> None:
    provider = service.actor("provider")
    first = await scheduled(service, provider)
    overlapping = service.schedule_body(
        service.actor("staff"),
        provider_id=provider["id"],
        starts_at=(service.clock.now + timedelta(hours=2, minutes=15)).isoformat(),
    )
    assert_problem(await service.request(CMD_SCHEDULE, overlapping), 409, "slot-taken")
    assert first["status"] == "scheduled"


async def test_reusing_an_appointment_id_is_already_exists(service: NatsService) -> None:
    staff = service.actor("staff")
    view = await scheduled(service, staff)
    other = service.schedule_body(staff, appointment_id=view["appointment_id"], duration_minutes=45)
    assert_problem(await service.request(CMD_SCHEDULE, other), 409, "already-exists")


async def test_cancelling_a_started_visit_is_appointment_started(service: NatsService) -> None:
    provider = service.actor("provider")
    view = await scheduled(service, provider)
    service.clock.advance(hours=1, minutes=55)
    key = {"appointment_id": view["appointment_id"], "actor": provider}
    assert_ok(await service.request(CMD_START, key))
    assert_problem(await service.request(CMD_CANCEL, key), 409, "appointment-started")


async def test_starting_a_cancelled_visit_is_appointment_cancelled(service: NatsService) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    key = {"appointment_id": view["appointment_id"], "actor": patient}
    assert_ok(await service.request(CMD_CANCEL, key))
    assert_problem(await service.request(CMD_START, key), 409, "appointment-cancelled")


async def test_starting_before_the_window_is_too_early_and_says_when(service: NatsService) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    key = {"appointment_id": view["appointment_id"], "actor": patient}
    doc = assert_problem(await service.request(CMD_START, key), 409, "too-early")
    assert doc["opens_at"] == view["start_window_opens_at"]


async def test_cancelling_an_ended_visit_is_appointment_past(service: NatsService) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    service.clock.advance(hours=3)
    key = {"appointment_id": view["appointment_id"], "actor": patient}
    assert_problem(await service.request(CMD_CANCEL, key), 409, "appointment-past")
    assert_problem(await service.request(CMD_START, key), 409, "appointment-past")


async def test_a_stale_expected_version_is_version_conflict(service: NatsService) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    key = {"appointment_id": view["appointment_id"], "actor": patient}
    assert_problem(
        await service.request(CMD_CANCEL, {**key, "expected_version": 2}), 412, "version-conflict"
    )
    assert_problem(
        await service.request(CMD_START, {**key, "expected_version": 0}), 412, "version-conflict"
    )
    assert assert_ok(await service.request(QUERY_GET, key))["version"] == 1


@pytest.mark.parametrize(
    ("header", "value", "field"),
    [
        ("If-Match", '"7"', "expected_version"),
        ("idempotency-key", "k1", "idempotency_key"),
        ("X-Consistency-Token", "x", "consistency_token"),
    ],
)
async def test_http_headers_whose_meaning_is_a_body_field_are_refused_not_ignored(
    service: NatsService, header: str, value: str, field: str
) -> None:
    patient = service.actor("patient")
    view = await scheduled(service, patient)
    key = {"appointment_id": view["appointment_id"], "actor": patient}
    # A stale If-Match ignored would cancel anyway: refused, naming the field to use.
    doc = assert_problem(
        await service.request(CMD_CANCEL, key, headers={header: value}), 400, "invalid-request"
    )
    assert header in doc["detail"] and field in doc["detail"]
    assert assert_ok(await service.request(QUERY_GET, key))["status"] == "scheduled"


async def test_an_idempotency_key_reused_for_another_request_is_refused(
    service: NatsService,
) -> None:
    staff = service.actor("staff")
    assert_ok(
        await service.request(CMD_SCHEDULE, service.schedule_body(staff, idempotency_key="k"))
    )
    other = service.schedule_body(staff, idempotency_key="k", duration_minutes=45)
    assert_problem(await service.request(CMD_SCHEDULE, other), 422, "idempotency-key-reused")


async def test_bad_visits_queries_are_invalid_requests(service: NatsService) -> None:
    staff = service.actor("staff")
    for query in (
        {"limit": 0},
        {"limit": 101},
        {"tab": "later"},
        {"cursor": "not-a-cursor"},
        {"consistency_token": "garbage"},
    ):
        reply = await service.request(QUERY_VISITS, {"actor": staff, **query})
        assert_problem(reply, 400, "invalid-request")


async def test_values_http_refuses_are_refused_over_nats_too(service: NatsService) -> None:
    # The limits of If-Match, Idempotency-Key, cursor and X-Consistency-Token over HTTP.
    staff = service.actor("staff")
    view = await scheduled(service, service.actor("patient"))
    key = {"appointment_id": view["appointment_id"], "actor": staff}
    for subject, body in (
        (CMD_CANCEL, {**key, "expected_version": 1_234_567_890}),
        (CMD_START, {**key, "expected_version": 2**64}),
        (CMD_CANCEL, {**key, "idempotency_key": ""}),
        (CMD_CANCEL, {**key, "idempotency_key": "k" * 256}),
        (QUERY_VISITS, {"actor": staff, "cursor": "c" * 201}),
        (QUERY_VISITS, {"actor": staff, "consistency_token": f"{view['appointment_id']}.1" * 3}),
    ):
        assert_problem(await service.request(subject, body), 400, "invalid-request")
    assert assert_ok(await service.request(QUERY_GET, key))["status"] == "scheduled"
