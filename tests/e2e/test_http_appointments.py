"""The appointments HTTP API, end to end: every endpoint, every error code, the tenancy matrix."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
import jwt
import msgspec
import pytest

from contracts.common import Principal
from services.auth import mint_token
from tests.e2e.conftest import JWT_SECRET, Api


def body_for(api: Api, patient: uuid.UUID, provider: uuid.UUID, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "patient_id": str(patient),
        "provider_id": str(provider),
        "starts_at": (api.clock.now + timedelta(hours=2)).isoformat(),
        "duration_minutes": 30,
        "timezone": "America/New_York",
        "visit_reason": "Follow-up on blood pressure",
    }
    body.update(changes)
    return body


async def schedule(
    api: Api, who: Principal, patient: Principal | None = None, **changes: Any
) -> httpx.Response:
    patient_id = patient.id if patient else (who.id if who.role == "patient" else uuid.uuid4())
    provider_id = who.id if who.role == "provider" else uuid.uuid4()
    return await api.client.post(
        "/v1/appointments",
        json=body_for(api, patient_id, provider_id, **changes),
        headers=api.auth(who),
    )


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    doc: dict[str, Any] = response.json()
    assert doc["status"] == status
    assert doc["code"] == code
    assert doc["type"].endswith(code) and doc["title"] and doc["detail"]
    return doc


async def test_patient_schedules_reads_and_cancels_their_appointment(api: Api) -> None:
    patient = api.principal("patient")
    created = await schedule(
        api, patient, starts_at=(api.clock.now + timedelta(hours=3)).isoformat()
    )
    assert created.status_code == 201, created.text
    view = created.json()
    assert created.headers["location"] == f"/v1/appointments/{view['appointment_id']}"
    assert created.headers["etag"] == '"1"'
    assert created.headers["x-consistency-token"]
    assert view["status"] == "scheduled" and view["version"] == 1
    assert view["patient_id"] == str(patient.id) and view["clinic_id"] == str(patient.clinic_id)
    assert view["starts_at"].endswith("Z") and view["ends_at"].endswith("Z")
    assert view["can_cancel"] is True and view["can_start"] is False

    read = await api.client.get(created.headers["location"], headers=api.auth(patient))
    assert read.status_code == 200 and read.json() == view and read.headers["etag"] == '"1"'

    cancelled = await api.client.post(
        f"{created.headers['location']}/cancel",
        json={"reason": "Feeling better"},
        headers=api.auth(patient),
    )
    assert cancelled.status_code == 200, cancelled.text
    after = cancelled.json()
    assert after["status"] == "cancelled" and after["version"] == 2
    assert after["cancelled_by"] == {"id": str(patient.id), "role": "patient"}
    assert after["cancellation_reason"] == "Feeling better" and after["cancelled_at"].endswith("Z")
    assert after["can_cancel"] is False and after["can_start"] is False
    assert cancelled.headers["etag"] == '"2"'


async def test_double_tap_on_cancel_is_a_quiet_success(api: Api) -> None:
    patient = api.principal("patient")
    location = (await schedule(api, patient)).headers["location"]
    first = await api.client.post(f"{location}/cancel", headers=api.auth(patient))
    second = await api.client.post(f"{location}/cancel", headers=api.auth(patient))
    assert first.status_code == second.status_code == 200
    assert second.json()["version"] == 2


async def test_start_inside_the_window_and_again(api: Api) -> None:
    patient = api.principal("patient")
    soon = (api.clock.now + timedelta(minutes=14)).isoformat()
    created = await schedule(api, patient, starts_at=soon)
    assert created.json()["can_start"] is True
    location = created.headers["location"]
    started = await api.client.post(f"{location}/start", headers=api.auth(patient))
    assert started.status_code == 200
    assert started.json()["status"] == "started" and started.json()["started_at"].endswith("Z")
    assert started.json()["can_start"] is True  # the patient can rejoin until the end
    again = await api.client.post(f"{location}/start", headers=api.auth(patient))
    assert again.status_code == 200 and again.json() == started.json()
    assert_problem(
        await api.client.post(f"{location}/cancel", headers=api.auth(patient)),
        409,
        "appointment-started",
    )


async def test_a_start_takes_no_body_but_an_empty_one(api: Api) -> None:
    """As over NATS, where a start request has no fields but its key and actor."""
    patient = api.principal("patient")
    location = (await schedule(api, patient)).headers["location"]
    for body in (b"{", b'{"reason": "x"}', b"[]", b"\xff", b" \n"):  # whitespace: no JSON
        answer = await api.client.post(f"{location}/start", content=body, headers=api.auth(patient))
        assert_problem(answer, 400, "invalid-request")
    # Whitespace alone, as cancel answers it (Litestar parses cancel's body first).
    blank = await api.client.post(f"{location}/cancel", content=b" \n", headers=api.auth(patient))
    assert_problem(blank, 400, "invalid-request")
    for body in (b"", b"null", b" null ", b"{}", b" {} "):
        answer = await api.client.post(f"{location}/start", content=body, headers=api.auth(patient))
        assert_problem(answer, 409, "too-early")  # decided: the body was no obstacle


async def test_start_before_the_window_is_too_early_and_says_when(api: Api) -> None:
    patient = api.principal("patient")
    starts_at = api.clock.now + timedelta(minutes=16)
    created = await schedule(api, patient, starts_at=starts_at.isoformat())
    doc = assert_problem(
        await api.client.post(f"{created.headers['location']}/start", headers=api.auth(patient)),
        409,
        "too-early",
    )
    assert doc["opens_at"] == created.json()["start_window_opens_at"]
    api.clock.advance(minutes=1)
    started = await api.client.post(
        f"{created.headers['location']}/start", headers=api.auth(patient)
    )
    assert started.status_code == 200


async def test_after_the_end_cancel_and_start_are_past(api: Api) -> None:
    patient = api.principal("patient")
    location = (await schedule(api, patient, duration_minutes=30)).headers["location"]
    api.clock.advance(hours=2, minutes=30)
    for action in ("cancel", "start"):
        assert_problem(
            await api.client.post(f"{location}/{action}", headers=api.auth(patient)),
            409,
            "appointment-past",
        )


async def test_starting_a_cancelled_appointment_is_refused(api: Api) -> None:
    staff = api.principal("staff")
    location = (
        await schedule(api, staff, starts_at=(api.clock.now + timedelta(minutes=5)).isoformat())
    ).headers["location"]
    await api.client.post(f"{location}/cancel", headers=api.auth(staff))
    assert_problem(
        await api.client.post(f"{location}/start", headers=api.auth(staff)),
        409,
        "appointment-cancelled",
    )


async def test_double_booking_a_provider_is_slot_taken(api: Api) -> None:
    provider = api.principal("provider")
    assert (await schedule(api, provider)).status_code == 201
    assert_problem(await schedule(api, provider), 409, "slot-taken")


async def test_same_appointment_id_is_a_retry_or_already_exists(api: Api) -> None:
    staff = api.principal("staff")
    body = body_for(api, uuid.uuid4(), uuid.uuid4(), appointment_id=str(uuid.uuid4()))
    first = await api.client.post("/v1/appointments", json=body, headers=api.auth(staff))
    retry = await api.client.post("/v1/appointments", json=body, headers=api.auth(staff))
    assert first.status_code == 201
    # Answered as the booking was: the gateway whose answer was lost sees no failure.
    assert retry.status_code == 201 and retry.json() == first.json()
    assert retry.headers["location"] == first.headers["location"]
    other = {**body, "duration_minutes": 45}
    assert_problem(
        await api.client.post("/v1/appointments", json=other, headers=api.auth(staff)),
        409,
        "already-exists",
    )


async def test_if_match_with_a_stale_version_is_412(api: Api) -> None:
    staff = api.principal("staff")
    location = (await schedule(api, staff)).headers["location"]
    assert_problem(
        await api.client.post(f"{location}/cancel", headers=api.auth(staff, **{"If-Match": '"7"'})),
        412,
        "version-conflict",
    )
    ok = await api.client.post(f"{location}/cancel", headers=api.auth(staff, **{"If-Match": '"1"'}))
    assert ok.status_code == 200


async def test_a_double_tap_on_yes_with_the_etag_and_one_key_shows_no_error(api: Api) -> None:
    # The details screen showed ETag "1"; the patient taps "YES" twice, at once and again,
    # each tap with the confirmation's one Idempotency-Key (as the README says).
    patient = api.principal("patient")
    location = (await schedule(api, patient)).headers["location"]
    shown = api.auth(patient, **{"If-Match": '"1"', "Idempotency-Key": str(uuid.uuid4())})
    taps = await asyncio.gather(
        *(api.client.post(f"{location}/cancel", headers=shown) for _ in range(2))
    )
    late = await api.client.post(f"{location}/cancel", headers=shown)
    for answer in (*taps, late):
        assert answer.status_code == 200, answer.text
        assert answer.json()["status"] == "cancelled" and answer.headers["etag"] == '"2"'
    # Without the key, the stale If-Match is refused, as the contract says.
    refused = await api.client.post(
        f"{location}/cancel", headers=api.auth(patient, **{"If-Match": '"1"'})
    )
    assert_problem(refused, 412, "version-conflict")


async def test_if_match_any_version_needs_only_the_appointment(api: Api) -> None:
    staff = api.principal("staff")
    location = (await schedule(api, staff)).headers["location"]
    any_version = api.auth(staff, **{"If-Match": "*"})
    ok = await api.client.post(f"{location}/cancel", headers=any_version)
    assert ok.status_code == 200 and ok.json()["status"] == "cancelled"
    assert_problem(
        await api.client.post(f"/v1/appointments/{uuid.uuid4()}/cancel", headers=any_version),
        404,
        "not-found",
    )


async def test_idempotency_key_replays_the_first_answer_and_refuses_another_body(api: Api) -> None:
    staff = api.principal("staff")
    headers = api.auth(staff, **{"Idempotency-Key": "booking-42"})
    body = body_for(api, uuid.uuid4(), uuid.uuid4())
    first = await api.client.post("/v1/appointments", json=body, headers=headers)
    again = await api.client.post("/v1/appointments", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["x-consistency-token"] == first.headers["x-consistency-token"]
    changed = {**body, "duration_minutes": 20}
    assert_problem(
        await api.client.post("/v1/appointments", json=changed, headers=headers),
        422,
        "idempotency-key-reused",
    )


async def test_a_refusal_under_an_idempotency_key_is_answered_again_once_it_would_pass(
    api: Api,
) -> None:
    staff = api.principal("staff")
    provider = uuid.uuid4()
    taken = await api.client.post(
        "/v1/appointments", json=body_for(api, uuid.uuid4(), provider), headers=api.auth(staff)
    )
    keyed = api.auth(staff, **{"Idempotency-Key": "booking-43"})
    body = body_for(api, uuid.uuid4(), provider, appointment_id=str(uuid.uuid4()))
    first = await api.client.post("/v1/appointments", json=body, headers=keyed)
    refusal = assert_problem(first, 409, "slot-taken")
    cancelled = await api.client.post(
        f"{taken.headers['location']}/cancel", headers=api.auth(staff)
    )
    assert cancelled.status_code == 200, cancelled.text
    # The slot is free: the same request without the key would book it now.
    again = await api.client.post("/v1/appointments", json=body, headers=keyed)
    assert_problem(again, 409, "slot-taken")
    assert again.json() == refusal and again.content == first.content
    unbooked = await api.client.get(
        f"/v1/appointments/{body['appointment_id']}", headers=api.auth(staff)
    )
    assert_problem(unbooked, 404, "not-found")
    assert_problem(
        await api.client.post(
            "/v1/appointments", json={**body, "duration_minutes": 20}, headers=keyed
        ),
        422,
        "idempotency-key-reused",
    )
    booked = await api.client.post("/v1/appointments", json=body, headers=api.auth(staff))
    assert booked.status_code == 201, booked.text


async def test_refusals_for_the_appointments_state_are_kept_under_the_key_others_are_not(
    api: Api,
) -> None:
    staff = api.principal("staff")
    appointment_id = str(uuid.uuid4())
    location = f"/v1/appointments/{appointment_id}"
    # 404: decided nothing, so the key still names the request that comes first and is decided.
    unknown = api.auth(staff, **{"Idempotency-Key": "start-1"})
    assert_problem(await api.client.post(f"{location}/start", headers=unknown), 404, "not-found")
    starts_at = (api.clock.now + timedelta(minutes=30)).isoformat()
    body = body_for(api, uuid.uuid4(), uuid.uuid4(), appointment_id=appointment_id)
    booked = await api.client.post(
        "/v1/appointments", json={**body, "starts_at": starts_at}, headers=api.auth(staff)
    )
    assert booked.status_code == 201, booked.text
    early = await api.client.post(f"{location}/start", headers=unknown)
    doc = assert_problem(early, 409, "too-early")
    assert doc["opens_at"] == booked.json()["start_window_opens_at"]
    api.clock.advance(minutes=20)  # inside the start window
    assert (await api.client.post(f"{location}/start", headers=unknown)).json() == doc
    stale = api.auth(staff, **{"Idempotency-Key": "start-2", "If-Match": '"2"'})
    assert_problem(
        await api.client.post(f"{location}/start", headers=stale), 412, "version-conflict"
    )
    started = await api.client.post(f"{location}/start", headers=api.auth(staff))
    assert started.status_code == 200 and started.json()["version"] == 2
    # At version 2 the same start would now be a rejoin (200): its key answers 412 again.
    again = await api.client.post(f"{location}/start", headers=stale)
    assert_problem(again, 412, "version-conflict")


async def test_history_lists_the_events_for_staff_and_the_provider_only(api: Api) -> None:
    provider = api.principal("provider")
    patient = api.principal("patient")
    location = (await schedule(api, provider, patient=patient)).headers["location"]
    await api.client.post(f"{location}/cancel", headers=api.auth(patient))
    for who in (provider, api.principal("staff")):
        history = await api.client.get(f"{location}/history", headers=api.auth(who))
        assert history.status_code == 200
        events = history.json()["events"]
        assert [e["type"] for e in events] == ["AppointmentScheduled", "AppointmentCancelled"]
        assert [e["stream_version"] for e in events] == [1, 2]
        assert events[1]["data"]["cancelled_by"]["id"] == str(patient.id)
        assert {
            "event_id",
            "schema_version",
            "global_position",
            "occurred_at",
            "correlation_id",
        } <= set(events[0])
    assert_problem(
        await api.client.get(f"{location}/history", headers=api.auth(patient)), 403, "forbidden"
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"duration_minutes": 4},
        {"duration_minutes": 241},
        {"duration_minutes": "30"},
        {"timezone": "Mars/Olympus_Mons"},
        {"starts_at": "2030-01-01T10:00:00"},
        {"starts_at": "yesterday"},
        {"visit_reason": "x" * 501},
        {"patient_id": "not-a-uuid"},
        {"unexpected": True},
    ],
)
async def test_invalid_schedule_bodies_are_400(api: Api, changes: dict[str, Any]) -> None:
    staff = api.principal("staff")
    body = body_for(api, uuid.uuid4(), uuid.uuid4(), **changes)
    assert_problem(
        await api.client.post("/v1/appointments", json=body, headers=api.auth(staff)),
        400,
        "invalid-request",
    )


async def test_reasons_of_500_characters_beyond_ascii_are_kept_whole(api: Api) -> None:
    patient = api.principal("patient")
    visit_reason, reason = "😀" * 500, "e\u0301" * 250  # 2,000 bytes; 500 code points
    assert_problem(
        await schedule(api, patient, visit_reason=visit_reason + "😀"), 400, "invalid-request"
    )
    created = await schedule(api, patient, visit_reason=visit_reason)
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert_problem(
        await api.client.post(
            f"{location}/cancel", json={"reason": reason + "é"}, headers=api.auth(patient)
        ),
        400,
        "invalid-request",
    )
    cancelled = await api.client.post(
        f"{location}/cancel", json={"reason": reason}, headers=api.auth(patient)
    )
    assert cancelled.status_code == 200, cancelled.text

    details = (await api.client.get(location, headers=api.auth(patient))).json()
    assert (details["visit_reason"], details["cancellation_reason"]) == (visit_reason, reason)
    past = await api.client.get(
        "/v1/visits?tab=past",
        headers={
            **api.auth(patient),
            "X-Consistency-Token": cancelled.headers["x-consistency-token"],
        },
    )
    assert [v["visit_reason"] for v in past.json()["items"]] == [visit_reason]


async def test_starts_at_in_the_past_or_beyond_a_year_is_400(api: Api) -> None:
    staff = api.principal("staff")
    for when in (api.clock.now - timedelta(minutes=1), api.clock.now + timedelta(days=366)):
        body = body_for(api, uuid.uuid4(), uuid.uuid4(), starts_at=when.isoformat())
        assert_problem(
            await api.client.post("/v1/appointments", json=body, headers=api.auth(staff)),
            400,
            "invalid-request",
        )


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'{"patient_id": 1}', b"\xff\xfe"])
async def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    headers = api.auth(api.principal("staff"), **{"Content-Type": "application/json"})
    assert_problem(
        await api.client.post("/v1/appointments", content=raw, headers=headers),
        400,
        "invalid-request",
    )


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (b"", "body is missing"),
        (b"{", "not valid JSON"),
        (b'{"reason": "\\ud83d"}', "not valid JSON"),
        (b'{"duration_minutes": 1}', "duration_minutes"),
        (b'{"duration_minutes": "30"}', "duration_minutes"),
    ],
)
async def test_a_refused_body_is_told_what_is_wrong(api: Api, raw: bytes, named: str) -> None:
    headers = api.auth(api.principal("staff"), **{"Content-Type": "application/json"})
    if raw.startswith(b'{"duration'):
        body = body_for(api, uuid.uuid4(), uuid.uuid4(), **msgspec.json.decode(raw))
        raw = msgspec.json.encode(body)
    doc = assert_problem(
        await api.client.post("/v1/appointments", content=raw, headers=headers),
        400,
        "invalid-request",
    )
    assert named in doc["detail"], doc


async def test_bodies_over_64_kib_are_413(api: Api) -> None:
    headers = api.auth(api.principal("staff"), **{"Content-Type": "application/json"})
    big = b'{"visit_reason": "' + b"x" * (65 * 1024) + b'"}'
    assert_problem(
        await api.client.post("/v1/appointments", content=big, headers=headers),
        413,
        "payload-too-large",
    )


@pytest.mark.parametrize("action", ["cancel", "start"])
async def test_bodies_over_64_kib_are_413_on_an_appointment_too(api: Api, action: str) -> None:
    headers = api.auth(api.principal("staff"), **{"Content-Type": "application/json"})
    big = b'{"reason": "' + b"x" * (65 * 1024) + b'"}'
    assert_problem(
        await api.client.post(
            f"/v1/appointments/{uuid.uuid4()}/{action}", content=big, headers=headers
        ),
        413,
        "payload-too-large",
    )


def forged_tokens(who: Principal) -> dict[str, str | None]:
    claims = {
        "sub": str(who.id),
        "role": who.role,
        "clinic_id": str(who.clinic_id),
        "exp": 4102444800,
    }
    return {
        "missing": None,
        "not bearer": "Basic abc",
        "garbage": "Bearer not.a.jwt",
        "other key": "Bearer "
        + jwt.encode(claims, "another-secret-another-secret-123", algorithm="HS256"),
        "expired": "Bearer "
        + mint_token(JWT_SECRET, who.role, who.id, who.clinic_id, ttl_seconds=-120),
        "no clinic": "Bearer "
        + jwt.encode(
            {k: v for k, v in claims.items() if k != "clinic_id"}, JWT_SECRET, algorithm="HS256"
        ),
        "other role": "Bearer "
        + jwt.encode({**claims, "role": "admin"}, JWT_SECRET, algorithm="HS256"),
        "no exp": "Bearer "
        + jwt.encode(
            {k: v for k, v in claims.items() if k != "exp"}, JWT_SECRET, algorithm="HS256"
        ),
        "alg none": "Bearer " + jwt.encode(claims, None, algorithm="none"),
    }


async def test_missing_forged_or_expired_tokens_are_401(api: Api) -> None:
    staff = api.principal("staff")
    location = (await schedule(api, staff)).headers["location"]
    for name, header in forged_tokens(staff).items():
        headers = {"Authorization": header} if header else {}
        response = await api.client.get(location, headers=headers)
        assert response.status_code == 401, name
        assert_problem(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"] == 'Bearer realm="clinic"', name


async def test_a_request_without_a_valid_token_is_401_before_its_body_or_parameters(
    api: Api,
) -> None:
    staff = api.principal("staff")
    location = (await schedule(api, staff)).headers["location"]
    bad: list[tuple[str, str, dict[str, str], bytes]] = [
        ("POST", "/v1/appointments", {}, b'{"x": 1}'),
        ("POST", "/v1/appointments", {}, b"not json"),
        ("POST", f"{location}/cancel", {}, b'{"reason": 7}'),
        ("POST", f"{location}/start", {"If-Match": "seven"}, b""),
        ("GET", "/v1/visits?limit=0&tab=nope", {}, b""),
        ("GET", "/v1/visits?cursor=forged", {}, b""),
        ("GET", "/v1/appointments/not-a-uuid", {}, b""),
        ("POST", "/v1/appointments/not-a-uuid/cancel", {}, b""),
    ]
    for name, header in forged_tokens(staff).items():
        auth = {"Authorization": header} if header else {}
        for method, path, headers, body in bad:
            answer = await api.client.request(
                method, path, headers={**auth, **headers}, content=body
            )
            assert_problem(answer, 401, "unauthenticated")
            assert "errors" not in answer.json(), (name, method, path)


async def test_patient_cannot_schedule_for_someone_else(api: Api) -> None:
    patient = api.principal("patient")
    other = api.principal("patient")
    assert_problem(await schedule(api, patient, patient=other), 403, "forbidden")
    provider = api.principal("provider")
    body = body_for(api, uuid.uuid4(), uuid.uuid4())
    assert_problem(
        await api.client.post("/v1/appointments", json=body, headers=api.auth(provider)),
        403,
        "forbidden",
    )


async def test_tenancy_matrix_for_reading_cancelling_and_starting(api: Api) -> None:
    patient = api.principal("patient")
    provider = api.principal("provider")
    starts = (api.clock.now + timedelta(minutes=10)).isoformat()
    body = body_for(api, patient.id, provider.id, starts_at=starts)
    location = (
        await api.client.post("/v1/appointments", json=body, headers=api.auth(provider))
    ).headers["location"]
    other_clinic = uuid.uuid4()
    outsiders = [
        api.principal("patient"),
        api.principal("provider"),
        Principal(id=patient.id, role="patient", clinic_id=other_clinic),
        api.principal("staff", other_clinic),
    ]
    for who in outsiders:
        for method, suffix in (
            ("GET", ""),
            ("POST", "/cancel"),
            ("POST", "/start"),
            ("GET", "/history"),
        ):
            response = await api.client.request(
                method, f"{location}{suffix}", headers=api.auth(who)
            )
            assert_problem(response, 404, "not-found")
    for who in (patient, provider, api.principal("staff")):
        assert (await api.client.get(location, headers=api.auth(who))).status_code == 200
    assert (
        await api.client.post(f"{location}/start", headers=api.auth(patient))
    ).status_code == 200


async def test_unknown_appointment_is_404(api: Api) -> None:
    staff = api.principal("staff")
    assert_problem(
        await api.client.get(f"/v1/appointments/{uuid.uuid4()}", headers=api.auth(staff)),
        404,
        "not-found",
    )


async def test_a_malformed_appointment_id_is_400_as_over_nats(api: Api) -> None:
    staff = api.principal("staff")
    for method, path in (
        ("GET", "/v1/appointments/not-a-uuid"),
        ("GET", "/v1/appointments/not-a-uuid/history"),
        ("POST", "/v1/appointments/not-a-uuid/cancel"),
        ("POST", "/v1/appointments/12345/start"),
    ):
        answer = await api.client.request(method, path, headers=api.auth(staff))
        doc = assert_problem(answer, 400, "invalid-request")
        assert "appointment_id" in doc["detail"], doc


async def test_health_metrics_and_openapi_need_no_token(api: Api) -> None:
    assert (await api.client.get("/health/live")).status_code == 200
    assert (await api.client.get("/health/ready")).status_code == 200
    await schedule(api, api.principal("staff"))
    metrics = await api.client.get("/metrics")
    assert metrics.status_code == 200
    assert 'clinic_commands_total{command="schedule",outcome="ok"}' in metrics.text
    assert "clinic_command_duration_seconds_bucket" in metrics.text
    schema = await api.client.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert "/v1/appointments/{appointment_id}/cancel" in schema.json()["paths"]
    for path, item in schema.json()["paths"].items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "appointment_id":
                    assert parameter["in"] == "path", path
                    assert parameter["schema"] == {"type": "string", "format": "uuid"}, path


def http_samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``clinic_http_*`` samples of a ``/metrics`` answer, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name.startswith("clinic_http_")
        for sample in family.samples
    }


async def test_http_requests_are_counted_and_timed_by_route_never_by_raw_path(api: Api) -> None:
    before = http_samples((await api.client.get("/metrics")).text)
    staff = api.principal("staff")
    created = await schedule(api, staff)
    assert created.status_code == 201
    appointment_id = created.json()["appointment_id"]
    cancelled = await api.client.post(
        f"/v1/appointments/{appointment_id}/cancel", json={}, headers=api.auth(staff)
    )
    assert cancelled.status_code == 200
    unknown = f"/nowhere/{uuid.uuid4()}"
    assert (await api.client.get(unknown)).status_code == 404
    assert (await api.client.request("PROPFIND", "/v1/appointments")).status_code == 405
    after = http_samples((await api.client.get("/metrics")).text)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    counted = "clinic_http_requests_total"
    assert grew(counted, method="POST", route="/v1/appointments", status="201") == 1
    cancel_route = "/v1/appointments/{appointment_id}/cancel"
    assert grew(counted, method="POST", route=cancel_route, status="200") == 1
    assert grew(counted, method="GET", route="unmatched", status="404") == 1
    assert grew(counted, method="other", route="unmatched", status="405") == 1
    timed = "clinic_http_request_duration_seconds_count"
    assert grew(timed, method="POST", route="/v1/appointments") == 1
    assert grew(timed, method="POST", route=cancel_route) == 1
    labels = " ".join(str(key) for key in after)
    assert appointment_id not in labels and unknown not in labels and "PROPFIND" not in labels
