"""OpenTelemetry spans, end to end in this process: a command's trace runs from its HTTP or
NATS request through the relay's publish to the projector and the notification service.

The services run as deployed (api, relay and projector roles; the notification service)
on real PostgreSQL and NATS; an SDK tracer provider records their spans in memory.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta

import nats
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from contracts.subjects import CMD_SCHEDULE
from tests.e2e.conftest import Api
from tests.support.service import running_notifications, service_env
from tests.support.telemetry import recorded_spans, spans_of_trace

PROJECTOR_SPAN = "visits-projector apply"
NOTIFICATIONS_SPAN = "notifications handle"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture
async def traced(
    spans: InMemorySpanExporter, api: Api, database_url: str, nats_url: str
) -> AsyncIterator[Api]:
    """The appointments service (every role) and the notification service, recording."""
    async with running_notifications(service_env(database_url, [nats_url])):
        yield api


def new_traceparent() -> tuple[int, int, str]:
    trace_id, span_id = random.getrandbits(128) | 1, random.getrandbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01"


async def whole_trace(
    exporter: InMemorySpanExporter, trace_id: int, server_span: str
) -> Sequence[ReadableSpan]:
    """The spans of the trace once the request, the publish and both consumers ended."""
    wanted = {server_span, "publish APPOINTMENTS", PROJECTOR_SPAN, NOTIFICATIONS_SPAN}
    async with asyncio.timeout(30):
        while True:
            spans = spans_of_trace(exporter, trace_id)
            if wanted <= {span.name for span in spans}:
                return spans
            await asyncio.sleep(0.05)


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [span for span in spans if span.name == name]
    return span


def assert_chain(spans: Sequence[ReadableSpan], server_name: str) -> ReadableSpan:
    """command span → producer span → both consumer spans; the command's span returned."""
    server = one(spans, server_name)
    producer = one(spans, "publish APPOINTMENTS")
    assert server.kind is SpanKind.SERVER and producer.kind is SpanKind.PRODUCER
    assert server.context is not None and producer.context is not None
    assert producer.parent is not None and producer.parent.span_id == server.context.span_id
    assert producer.attributes is not None
    assert str(producer.attributes["messaging.destination.name"]).startswith("appointments.")
    for name in (PROJECTOR_SPAN, NOTIFICATIONS_SPAN):
        consumers = [span for span in spans if span.name == name]  # one per delivery
        assert consumers, name
        for consumer in consumers:
            assert consumer.kind is SpanKind.CONSUMER, name
            assert consumer.parent is not None
            assert consumer.parent.span_id == producer.context.span_id, name
    return server


def schedule_body(api: Api) -> dict[str, str | int]:
    return {
        "patient_id": str(uuid.uuid4()),
        "provider_id": str(uuid.uuid4()),
        "starts_at": (api.clock.now + timedelta(hours=3)).isoformat(),
        "duration_minutes": 20,
        "timezone": "UTC",
    }


async def test_an_http_command_and_its_events_form_one_trace(
    traced: Api, spans: InMemorySpanExporter
) -> None:
    trace_id, caller_span, header = new_traceparent()
    staff = traced.principal("staff")
    headers = traced.auth(staff, traceparent=header)
    created = await traced.client.post(
        "/v1/appointments", json=schedule_body(traced), headers=headers
    )
    assert created.status_code == 201, created.text

    trace = await whole_trace(spans, trace_id, "POST /v1/appointments")
    server = assert_chain(trace, "POST /v1/appointments")
    assert server.parent is not None and server.parent.span_id == caller_span
    assert server.parent.is_remote
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 201

    history = await traced.client.get(
        f"{created.headers['location']}/history", headers=traced.auth(staff)
    )
    [event] = history.json()["events"]
    assert event["correlation_id"] == str(uuid.UUID(int=trace_id))


async def test_without_a_traceparent_the_new_trace_id_is_the_correlation_id(
    traced: Api, spans: InMemorySpanExporter
) -> None:
    staff = traced.principal("staff")
    created = await traced.client.post(
        "/v1/appointments", json=schedule_body(traced), headers=traced.auth(staff)
    )
    assert created.status_code == 201, created.text
    history = await traced.client.get(
        f"{created.headers['location']}/history", headers=traced.auth(staff)
    )
    [event] = history.json()["events"]
    trace_id = uuid.UUID(event["correlation_id"]).int

    trace = await whole_trace(spans, trace_id, "POST /v1/appointments")
    server = assert_chain(trace, "POST /v1/appointments")
    assert server.parent is None  # a root span: the trace began here


async def test_a_nats_command_and_its_events_form_one_trace(
    traced: Api, spans: InMemorySpanExporter, nats_url: str
) -> None:
    trace_id, caller_span, header = new_traceparent()
    staff = traced.principal("staff")
    request = {
        **schedule_body(traced),
        "actor": {"id": str(staff.id), "role": "staff", "clinic_id": str(staff.clinic_id)},
    }
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(
            CMD_SCHEDULE, json.dumps(request).encode(), timeout=10, headers={"traceparent": header}
        )
    finally:
        await nc.close()
    assert reply.headers is not None and "Nats-Service-Error-Code" not in reply.headers, reply.data
    assert reply.headers["X-Correlation-Id"] == str(uuid.UUID(int=trace_id))

    trace = await whole_trace(spans, trace_id, CMD_SCHEDULE)
    server = assert_chain(trace, CMD_SCHEDULE)
    assert server.parent is not None and server.parent.span_id == caller_span
