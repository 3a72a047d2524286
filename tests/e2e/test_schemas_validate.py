"""Real traffic matches the committed contracts: every reply, problem document and
published event validates against the generated JSON Schemas, and reply headers against
the AsyncAPI document's message headers."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import cache
from typing import Any

import jsonschema
import pytest
from nats.aio.msg import Msg

from contracts.generate import ASYNCAPI_FILE, SCHEMAS_DIR
from contracts.subjects import (
    CMD_CANCEL,
    CMD_SCHEDULE,
    CMD_START,
    EVENTS_SUBJECTS,
    QUERY_GET,
    QUERY_VISITS,
)
from tests.e2e.nats_support import NatsService, assert_ok, is_error, running_service


@cache
def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS_DIR / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


@cache
def header_validator(message: str) -> jsonschema.Draft7Validator:
    document = json.loads((SCHEMAS_DIR / ASYNCAPI_FILE).read_text())
    headers = document["components"]["messages"][message]["headers"]
    return jsonschema.Draft7Validator(headers, format_checker=jsonschema.FormatChecker())


def check(name: str, instance: Any) -> None:
    errors = [e.message for e in validator(name).iter_errors(instance)]
    assert not errors, f"{name}: {errors} in {instance}"


def check_reply(msg: Msg, reply: str) -> None:
    """A success reply against its schema, an error reply against Problem; headers too."""
    name = "Problem" if is_error(msg) else reply
    check(name, json.loads(msg.data))
    errors = [e.message for e in header_validator(name).iter_errors(dict(msg.headers or {}))]
    assert not errors, f"{name} headers: {errors}"


@pytest.fixture
async def service(database_url: str, nats_url: str) -> AsyncIterator[NatsService]:
    async with running_service(database_url, nats_url) as running:
        yield running


async def test_requests_replies_problems_and_events_match_the_schemas(
    service: NatsService,
) -> None:
    patient = service.actor("patient")
    provider = service.actor("provider")
    problems: list[str] = []

    async def send(subject: str, request: str, reply: str, body: dict[str, Any]) -> Msg:
        check(request, body)
        msg = await service.request(subject, body)
        check_reply(msg, reply)
        if is_error(msg):
            problems.append(json.loads(msg.data)["code"])
        return msg

    body = service.schedule_body(patient, provider_id=provider["id"], idempotency_key="a")
    view = assert_ok(await send(CMD_SCHEDULE, "ScheduleRequest", "AppointmentView", body))
    first = {"appointment_id": view["appointment_id"], "actor": patient}
    await send(QUERY_GET, "GetRequest", "AppointmentView", first)
    await send(CMD_START, "StartRequest", "AppointmentView", first)  # too-early
    await send(CMD_CANCEL, "CancelRequest", "AppointmentView", {**first, "reason": "Sick"})
    await send(CMD_START, "StartRequest", "AppointmentView", first)  # appointment-cancelled

    later = (service.clock.now + timedelta(hours=5)).isoformat()
    body = service.schedule_body(provider, starts_at=later, visit_reason=None)
    second = assert_ok(await send(CMD_SCHEDULE, "ScheduleRequest", "AppointmentView", body))
    service.clock.advance(hours=4, minutes=50)
    key = {"appointment_id": second["appointment_id"], "actor": provider, "expected_version": 1}
    started = await send(CMD_START, "StartRequest", "AppointmentView", key)
    assert assert_ok(started)["status"] == "started"
    await send(CMD_CANCEL, "CancelRequest", "AppointmentView", key)  # version-conflict

    token = (started.headers or {})["X-Consistency-Token"]
    visits = {"actor": provider, "consistency_token": token}
    page = assert_ok(await send(QUERY_VISITS, "VisitsRequest", "VisitsPage", visits))
    assert page["items"]
    await send(QUERY_VISITS, "VisitsRequest", "VisitsPage", {"actor": patient, "tab": "past"})
    missing = {"appointment_id": str(uuid.uuid4()), "actor": patient}
    await send(QUERY_GET, "GetRequest", "AppointmentView", missing)  # not-found

    assert problems == ["too-early", "appointment-cancelled", "version-conflict", "not-found"]

    js = service.nc.jetstream()
    subscription = await js.subscribe(EVENTS_SUBJECTS, ordered_consumer=True)
    seen = []
    for _ in range(4):  # scheduled, cancelled; scheduled, started
        msg = await subscription.next_msg(timeout=10)
        envelope = json.loads(msg.data)
        check("EventEnvelope", envelope)
        check(f"{envelope['type']}Event", envelope)
        clinic, appointment, kind = msg.subject.split(".")[-3:]
        assert clinic == envelope["data"]["clinic_id"] and appointment == envelope["stream_id"]
        assert (msg.headers or {})["Nats-Msg-Id"] == envelope["event_id"]
        seen.append((envelope["stream_id"], kind, envelope["stream_version"]))
    await subscription.unsubscribe()
    assert sorted(seen) == sorted(
        [
            (view["appointment_id"], "scheduled", 1),
            (view["appointment_id"], "cancelled", 2),
            (second["appointment_id"], "scheduled", 1),
            (second["appointment_id"], "started", 2),
        ]
    )


async def test_requests_the_schemas_refuse_are_refused_by_the_service(
    service: NatsService,
) -> None:
    actor = service.actor("staff")
    for request, subject, body in (
        ("VisitsRequest", QUERY_VISITS, {"actor": actor, "page": 2}),
        ("GetRequest", QUERY_GET, {"appointment_id": str(uuid.uuid4())}),
        ("VisitsRequest", QUERY_VISITS, {"actor": {**actor, "role": "admin"}}),
        ("ScheduleRequest", CMD_SCHEDULE, service.schedule_body(actor, duration_minutes=241)),
    ):
        assert list(validator(request).iter_errors(body)), body
        reply = await service.request(subject, body)
        assert is_error(reply) and json.loads(reply.data)["status"] == 400
        check_reply(reply, "Problem")
