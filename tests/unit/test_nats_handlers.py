"""The NATS endpoints' translation on in-memory fakes: failures, tracing ids, header text."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from services.appointments.domain.rules import Rules
from services.appointments.entrypoints.nats.handlers import ServiceApi
from services.appointments.entrypoints.nats.replies import MAX_ERROR_HEADER_LENGTH, header_text
from services.appointments.service_layer.handlers import Appointments
from services.appointments.service_layer.ports import RecordedEvent
from services.errors import Unavailable
from tests.support.clock import ManualClock
from tests.support.fakes import FakeEventStore

CLINIC = uuid.uuid4()


class BrokenStore(FakeEventStore):
    """A store failing the way nothing anticipated (a bug, a driver surprise)."""

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        raise RuntimeError("boom: the secret connection string")


class DownStore(FakeEventStore):
    """A store whose database does not answer."""

    async def load(self, stream_id: UUID) -> list[RecordedEvent]:
        raise Unavailable("PostgreSQL is unreachable.", retry_after=3)


def api_on(store: FakeEventStore, clock: ManualClock | None = None) -> ServiceApi:
    clock = clock or ManualClock()
    appointments = Appointments(store, store, clock, uuid.uuid4, Rules(timedelta(minutes=15)))
    return ServiceApi(appointments, visits=None)


def actor(role: str = "staff") -> dict[str, str]:
    return {"id": str(uuid.uuid4()), "role": role, "clinic_id": str(CLINIC)}


def schedule_request(clock: ManualClock) -> bytes:
    body: dict[str, Any] = {
        "patient_id": str(uuid.uuid4()),
        "provider_id": str(uuid.uuid4()),
        "starts_at": (clock.now + timedelta(hours=2)).isoformat(),
        "duration_minutes": 30,
        "timezone": "Europe/Paris",
        "actor": actor(),
    }
    return json.dumps(body).encode()


async def test_an_unexpected_failure_is_unavailable_and_logged_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = json.dumps({"appointment_id": str(uuid.uuid4()), "actor": actor()}).encode()
    with caplog.at_level(logging.ERROR):
        reply = await api_on(BrokenStore()).answer("get", request, None)
    doc = json.loads(reply.data)
    assert reply.error_code == "503" and doc["code"] == "unavailable"
    assert reply.headers["Retry-After"] == "1"
    assert "boom" not in reply.data.decode() and "boom" not in reply.headers["Nats-Service-Error"]
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_a_database_outage_is_unavailable_with_its_retry_after() -> None:
    request = json.dumps({"appointment_id": str(uuid.uuid4()), "actor": actor()}).encode()
    reply = await api_on(DownStore()).answer("cancel", request, None)
    assert reply.error_code == "503" and reply.headers["Retry-After"] == "3"
    assert reply.headers["Nats-Service-Error"] == "PostgreSQL is unreachable."


async def test_visits_without_a_read_side_are_unavailable_but_bad_input_still_invalid() -> None:
    api = api_on(FakeEventStore())
    reply = await api.answer("visits", json.dumps({"actor": actor()}).encode(), None)
    assert reply.error_code == "503"
    reply = await api.answer("visits", b'{"tab": "upcoming"}', None)
    assert reply.error_code == "400"


async def test_the_correlation_id_is_echoed_and_recorded_on_the_events() -> None:
    clock = ManualClock()
    store = FakeEventStore()
    correlation = uuid.uuid4()
    reply = await api_on(store, clock).answer(
        "schedule", schedule_request(clock), {"x-correlation-id": str(correlation)}
    )
    assert reply.error_code is None and reply.headers["X-Correlation-Id"] == str(correlation)
    (stream,) = store.streams.values()
    assert stream[0].envelope.correlation_id == correlation
    assert stream[0].envelope.causation_id not in (None, correlation)


@pytest.mark.parametrize("sent", ["not-a-uuid", str(UUID(int=0))])
async def test_a_malformed_or_nil_correlation_id_is_replaced_by_a_new_one(sent: str) -> None:
    clock = ManualClock()
    reply = await api_on(FakeEventStore(), clock).answer(
        "schedule", schedule_request(clock), {"X-Correlation-Id": sent}
    )
    assert UUID(reply.headers["X-Correlation-Id"]).int != 0


async def test_an_oversized_request_is_refused_before_it_is_decoded() -> None:
    reply = await api_on(BrokenStore()).answer("get", b"{" + b" " * 70_000 + b"}", None)
    assert reply.error_code == "413"
    assert json.loads(reply.data)["code"] == "payload-too-large"


def test_error_header_text_is_one_bounded_line_of_printable_ascii() -> None:
    assert header_text("bad\r\nNats-Inject: 1\tzone 'Zürich'") == "bad Nats-Inject: 1 zone 'Z rich'"
    long = header_text("x" * 1000)
    assert len(long) == MAX_ERROR_HEADER_LENGTH and long.endswith("...")
    assert header_text("\n") == "error"


async def _scheduled(api: ServiceApi, clock: ManualClock, **extra: Any) -> Any:
    body = json.loads(schedule_request(clock))
    body.update(extra)
    reply = await api.answer("schedule", json.dumps(body).encode(), None)
    assert reply.error_code is None, reply.data
    return reply


async def test_a_command_reply_carries_the_version_and_the_consistency_token() -> None:
    clock = ManualClock()
    api = api_on(FakeEventStore(), clock)
    reply = await _scheduled(api, clock)
    view = json.loads(reply.data)
    assert reply.headers["ETag"] == '"1"'
    assert reply.headers["X-Consistency-Token"] == f"{view['appointment_id']}.1"
    request = {"appointment_id": view["appointment_id"], "actor": actor()}
    got = await api.answer("get", json.dumps(request).encode(), None)
    assert got.error_code is None and got.headers["ETag"] == '"1"'


@pytest.mark.parametrize("command", ["cancel", "start"])
async def test_a_stale_expected_version_is_a_version_conflict(command: str) -> None:
    clock = ManualClock()
    api = api_on(FakeEventStore(), clock)
    view = json.loads((await _scheduled(api, clock)).data)
    request = {"appointment_id": view["appointment_id"], "actor": actor(), "expected_version": 7}
    reply = await api.answer(command, json.dumps(request).encode(), None)
    assert reply.error_code == "412" and json.loads(reply.data)["code"] == "version-conflict"


async def test_a_cancel_keeps_its_reason() -> None:
    clock, store = ManualClock(), FakeEventStore()
    api = api_on(store, clock)
    view = json.loads((await _scheduled(api, clock)).data)
    request = {"appointment_id": view["appointment_id"], "actor": actor(), "reason": "flu"}
    reply = await api.answer("cancel", json.dumps(request).encode(), None)
    assert reply.error_code is None
    cancelled = store.streams[UUID(view["appointment_id"])][-1].event
    assert cancelled.reason == "flu"  # type: ignore[union-attr]


async def test_an_idempotency_key_answers_a_retry_and_refuses_another_body() -> None:
    clock, store = ManualClock(), FakeEventStore()
    api = api_on(store, clock)
    body = json.loads(schedule_request(clock))
    body["idempotency_key"] = "book-1"
    first = await api.answer("schedule", json.dumps(body).encode(), None)
    again = await api.answer("schedule", json.dumps(body).encode(), None)
    assert first.error_code is None and again.error_code is None
    assert json.loads(again.data)["appointment_id"] == json.loads(first.data)["appointment_id"]
    assert len(store.streams) == 1
    other = {**body, "duration_minutes": 45}
    reused = await api.answer("schedule", json.dumps(other).encode(), None)
    assert reused.error_code == "422"
    assert json.loads(reused.data)["code"] == "idempotency-key-reused"


async def test_a_refusal_under_an_idempotency_key_is_replied_again_as_it_was() -> None:
    clock, store = ManualClock(), FakeEventStore()
    api = api_on(store, clock)
    booking = json.loads(schedule_request(clock))
    booking["starts_at"] = (clock.now + timedelta(hours=3)).isoformat()
    view = json.loads((await api.answer("schedule", json.dumps(booking).encode(), None)).data)
    start = {"appointment_id": view["appointment_id"], "actor": actor(), "idempotency_key": "s"}
    first = await api.answer("start", json.dumps(start).encode(), None)
    clock.advance(hours=2, minutes=50)  # the window is open: a new request would start it
    again = await api.answer("start", json.dumps(start).encode(), None)
    assert first.error_code == again.error_code == "409"
    assert again.data == first.data and json.loads(again.data)["code"] == "too-early"
    other = await api.answer("start", json.dumps({**start, "expected_version": 1}).encode(), None)
    assert other.error_code == "422"


async def test_an_error_reply_is_a_problem_document() -> None:
    request = json.dumps({"appointment_id": str(uuid.uuid4()), "actor": actor()}).encode()
    reply = await api_on(FakeEventStore()).answer("get", request, None)
    assert reply.error_code == "404"
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert json.loads(reply.data)["code"] == "not-found"


def test_an_error_header_is_cut_at_256_characters() -> None:
    assert len(header_text("x" * 1000)) == 256 and header_text("x" * 1000).endswith("...")
    assert header_text("y" * 256) == "y" * 256
