"""HTTP input, valid or not: no answer is a 5xx, and every answer is what the OpenAPI
document says (status, content type, headers, body).

schemathesis fuzzes each operation of the running service's own document in a test of its
own (so ``pytest -n auto`` spreads them), with tokens of a staff member and of a patient,
valid input steered half the time towards the deep paths (bookings in the future, ids of
appointments that exist, retries). Hypothesis runs derandomized: a failure reproduces.
Then what no schema describes: oversized and chunked bodies, odd encodings, huge headers.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.embedded import EmbeddedNats
from tests.e2e.conftest import Api

pytestmark = pytest.mark.fault

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
#: (method, path, cases of valid input, cases of invalid input)
OPERATIONS = [
    ("POST", "/v1/appointments", 600, 400),
    ("GET", "/v1/appointments/{appointment_id}", 300, 200),
    ("POST", "/v1/appointments/{appointment_id}/cancel", 500, 300),
    ("POST", "/v1/appointments/{appointment_id}/start", 400, 250),
    ("GET", "/v1/appointments/{appointment_id}/history", 300, 200),
    ("GET", "/v1/visits", 500, 300),
    ("GET", "/health/live", 20, 0),
    ("GET", "/health/ready", 20, 0),
    ("GET", "/metrics", 20, 0),
]
APPOINTMENTS = 12
PROVIDERS = [uuid.uuid4() for _ in range(3)]


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    """A NATS server of these tests alone: no machine-wide lock, they run beside others."""
    return nats_server.url


async def seed(api: Api, tokens: dict[str, dict[str, str]], patient: uuid.UUID) -> list[str]:
    """Appointments of ``patient`` for the ids the cases use: half inside the start window."""
    ids = []
    for i in range(APPOINTMENTS):
        starts = api.clock.now + (timedelta(minutes=10) if i % 2 else timedelta(days=1 + i))
        body = {
            "patient_id": str(patient),
            "provider_id": str(uuid.uuid4()),
            "starts_at": starts.isoformat(),
            "duration_minutes": 30,
            "timezone": "Europe/Berlin",
        }
        created = await api.client.post("/v1/appointments", json=body, headers=tokens["staff"])
        assert created.status_code == 201, created.text
        ids.append(created.json()["appointment_id"])
    return ids


def steer(
    case: Any, api: Api, patient: uuid.UUID, ids: list[str], rng: random.Random, booked: list[Any]
) -> Any:
    """Half the valid cases made likely to pass the rules the schema cannot state: real
    ids, real versions, bookings in the future (a third of them retries of an earlier one)."""
    if rng.random() < 0.5:
        return case
    if "appointment_id" in (case.path_parameters or {}):
        case.path_parameters["appointment_id"] = rng.choice(ids)
    if isinstance(case.body, dict) and "starts_at" in case.body:
        if booked and rng.random() < 0.3:
            case.body = dict(rng.choice(booked))
        else:
            starts = api.clock.now + timedelta(minutes=rng.randrange(5, 60 * 24 * 300))
            case.body.update(
                appointment_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                starts_at=starts.isoformat(),
                timezone=rng.choice(["Europe/Berlin", "America/New_York", "UTC"]),
                patient_id=str(patient),
                provider_id=str(rng.choice(PROVIDERS)),
            )
            booked.append(dict(case.body))
    headers = case.headers or {}
    if "If-Match" in headers:
        headers["If-Match"] = f'"{rng.randrange(0, 4)}"'
    if "X-Consistency-Token" in headers:
        headers["X-Consistency-Token"] = f"{rng.choice(ids)}.1"
    return case


def fuzz(
    api: Api,
    method: str,
    path: str,
    counts: dict[GenerationMode, int],
    tokens: dict[str, dict[str, str]],
    patient: uuid.UUID,
    ids: list[str],
) -> int:
    """Run the cases of one operation (blocking: the server runs on the test's loop)."""
    schema = schemathesis.openapi.from_url(f"{api.base_url}/schema/openapi.json")
    # Each case is sent with a valid token (``tokens``): a case generated without one, or
    # with a malformed one, would go out authenticated anyway. Bad tokens have their own
    # tests (tests/unit/test_auth.py, and test_odd_requests_get_a_problem_never_a_5xx).
    schema.config.generation.update(with_security_parameters=False)
    operation = schema[path][method]
    session = requests.Session()
    rng = random.Random(f"{method} {path}")
    booked: list[Any] = []
    sent = 0
    for mode, count in counts.items():
        if not count:
            continue
        strategy = operation.as_strategy(generation_mode=mode)

        @settings(
            max_examples=count,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy, who=st.sampled_from(sorted(tokens)))
        def run(case: Any, who: str) -> None:
            nonlocal sent
            if mode is GenerationMode.POSITIVE:  # noqa: B023 (run() is called in this iteration)
                case = steer(case, api, patient, ids, rng, booked)
            response = case.call(base_url=api.base_url, session=session, headers=tokens[who])
            sent += 1
            case.validate_response(response, checks=CHECKS, headers=tokens[who])

        run()
    return sent


@pytest.mark.parametrize(
    ("method", "path", "valid", "invalid"), OPERATIONS, ids=[f"{m} {p}" for m, p, *_ in OPERATIONS]
)
async def test_every_answer_matches_the_openapi_document(
    api: Api,
    method: str,
    path: str,
    valid: int,
    invalid: int,
    record_property: pytest.RecordProperty,
) -> None:
    staff, patient = api.principal("staff"), api.principal("patient")
    tokens = {"staff": api.auth(staff), "patient": api.auth(patient)}
    ids = await seed(api, tokens, patient.id)
    counts = {GenerationMode.POSITIVE: valid, GenerationMode.NEGATIVE: invalid}
    sent = await asyncio.to_thread(fuzz, api, method, path, counts, tokens, patient.id, ids)
    record_property("figures", json.dumps({"operation": f"{method} {path}", "requests": sent}))
    print(f"schemathesis {method} {path}: {sent} requests")
    assert sent > 0


async def test_the_document_lists_every_operation_fuzzed(api: Api) -> None:
    doc = (await api.client.get("/schema/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(m, p) for m, p, *_ in OPERATIONS}
    # What else a client reads there: unknown body fields are refused (400), every /v1
    # route wants the bearer token.
    schemas = doc["components"]["schemas"]
    assert schemas["ScheduleBody"]["additionalProperties"] is False
    assert schemas["CancelBody"]["additionalProperties"] is False
    assert doc["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    # A consistency token is documented as a string (an empty one is no token: a read that
    # does not wait; the service refuses another that it did not issue, naming the header).
    (token,) = [p for p in doc["paths"]["/v1/visits"]["get"]["parameters"] if p["in"] == "header"]
    staff = api.principal("staff")
    refused = await api.client.get("/v1/visits", headers=api.auth(staff, **{token["name"]: "0"}))
    assert problem_of(refused) == "400 invalid-request"
    assert "X-Consistency-Token is not a token" in refused.json()["detail"]
    empty = await api.client.get("/v1/visits", headers=api.auth(staff, **{token["name"]: ""}))
    assert empty.status_code == 200, empty.text  # no token: a read that does not wait
    assert all(
        op.get("security") == [{"BearerToken": []}]
        for path, ops in doc["paths"].items()
        if path.startswith("/v1/")
        for op in ops.values()
    )


def problem_of(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/problem+json", response.text
    code: str = response.json()["code"]
    return f"{response.status_code} {code}"


async def test_oversized_bodies_are_413_however_they_arrive(api: Api) -> None:
    staff = api.principal("staff")
    headers = api.auth(staff, **{"Content-Type": "application/json"})
    location = (await seed(api, {"staff": api.auth(staff)}, uuid.uuid4()))[0]

    async def chunked(size: int) -> AsyncIterator[bytes]:  # no Content-Length
        for _ in range(size // 65536):
            yield b"x" * 65536

    for path in ("/v1/appointments", f"/v1/appointments/{location}/cancel"):
        for body in (b"x" * (64 * 1024 + 1), b"x" * (16 << 20), chunked(4 << 20)):
            answer = await api.client.post(path, content=body, headers=headers)
            assert problem_of(answer) == "413 payload-too-large", path
        exactly = await api.client.post(path, content=b"x" * (64 * 1024), headers=headers)
        assert problem_of(exactly) == "400 invalid-request"
    read = await api.client.get(f"/v1/appointments/{location}", headers=headers)
    assert read.json()["version"] == 1


async def test_odd_requests_get_a_problem_never_a_5xx(
    api: Api, record_property: pytest.RecordProperty
) -> None:
    staff = api.principal("staff")
    auth = api.auth(staff)
    appointment = (await seed(api, {"staff": auth}, uuid.uuid4()))[0]
    cancel = f"/v1/appointments/{appointment}/cancel"
    deep = 30_000  # under 64 KiB: the decoder, not the size limit, meets it
    odd: list[tuple[str, str, dict[str, Any], bytes]] = [
        ("POST", "/v1/appointments", {}, b"[" * deep + b"]" * deep),
        ("POST", "/v1/appointments", {}, b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        ("POST", cancel, {}, b'{"reason": ' + b"[" * deep + b"]" * deep + b"}"),
        ("POST", "/v1/appointments", {}, b'{"patient_id": "\xff\xfe"}'),
        ("POST", cancel, {}, b'{"reason": 1e999999}'),
        ("POST", cancel, {"Content-Type": "text/plain"}, b"please cancel"),
        ("POST", cancel, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x\r\n"),
        ("POST", cancel, {"Content-Type": "application/x-www-form-urlencoded"}, b"a=%ff"),
        ("POST", cancel, {"Content-Type": "application/json; charset=latin-1"}, b"\xe9"),
        ("GET", "/v1/visits", {"X-Junk": "a" * (1 << 20)}, b""),
        ("GET", "/v1/visits", {f"X-H{i}": "v" for i in range(2000)}, b""),
        ("GET", "/v1/visits", {"X-Consistency-Token": b"\xff\xfe"}, b""),
        ("GET", "/v1/visits", {"X-Correlation-Id": b"\xff" * 100}, b""),
        ("POST", cancel, {"If-Match": b'"\xff"'}, b""),
        # Latin-1 superscripts: digits to str.isdigit(), not to int().
        ("POST", cancel, {"If-Match": b'"\xb2"'}, b""),
        ("POST", cancel, {"If-Match": b'W/"1\xb9"'}, b""),
        ("POST", cancel, {"Idempotency-Key": b"\xff\xfe"}, b""),
        ("GET", "/v1/visits", {"Authorization": b"Bearer \xff\xfe"}, b""),
        ("GET", "/v1/visits", {"Authorization": "Bearer " + "a" * 60_000}, b""),
        ("GET", "/v1/visits?tab=%ff%fe&limit=%00", {}, b""),
        ("GET", "/v1/visits?limit=1&limit=2&limit=" + "9" * 5000, {}, b""),
        ("GET", "/v1/visits?cursor=%00" + "a" * 10_000, {}, b""),
        ("GET", "/v1/appointments/..%2f..%2fetc%2fpasswd", {}, b""),
        ("GET", f"/v1/appointments/{{{appointment}}}", {}, b""),
        ("GET", "/v1/appointments/" + "a" * 10_000, {}, b""),
    ]
    for method in ("PUT", "PATCH", "DELETE", "TRACE"):
        odd += [(method, path, {}, b"") for path in ("/v1/appointments", cancel, "/v1/visits")]
    seen: Counter[str] = Counter()
    for method, path, headers, body in odd:
        answer = await api.client.request(method, path, headers={**auth, **headers}, content=body)
        assert answer.status_code < 500, (method, path[:80], answer.text)
        if answer.status_code == 405:
            assert answer.headers["allow"]
        seen[problem_of(answer) if answer.status_code >= 400 else str(answer.status_code)] += 1
    still = await api.client.get(f"/v1/appointments/{appointment}", headers=auth)
    assert still.status_code == 200
    # The document allows a null body for cancel: no reason given.
    nulled = await api.client.post(cancel, content=b"null", headers=auth)
    assert nulled.status_code == 200, nulled.text
    record_property("figures", json.dumps({"requests": len(odd), "answers": dict(seen)}))
    print(f"odd HTTP requests: {len(odd)}, answered {dict(seen)}")
