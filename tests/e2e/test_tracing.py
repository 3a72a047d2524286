"""One id follows a request: HTTP traceparent → event envelope → NATS traceparent header."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import msgspec
import nats

from contracts.subjects import EVENTS_SUBJECTS
from services.tracing import trace_id_of
from tests.e2e.conftest import Api


async def test_a_requests_trace_id_reaches_the_event_and_its_nats_message(
    api: Api, nats_url: str
) -> None:
    trace = uuid.uuid4()
    staff = api.principal("staff")
    headers = api.auth(staff, traceparent=f"00-{trace.hex}-{'1' * 16}-01")
    body = {
        "patient_id": str(uuid.uuid4()),
        "provider_id": str(uuid.uuid4()),
        "starts_at": (api.clock.now + timedelta(hours=3)).isoformat(),
        "duration_minutes": 20,
        "timezone": "UTC",
    }
    created = await api.client.post("/v1/appointments", json=body, headers=headers)
    assert created.status_code == 201
    history = await api.client.get(f"{created.headers['location']}/history", headers=headers)
    [event] = history.json()["events"]
    assert event["correlation_id"] == str(trace)

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(EVENTS_SUBJECTS, ordered_consumer=True)
        async with asyncio.timeout(10):
            while True:
                msg = await sub.next_msg(timeout=10)
                envelope = msgspec.json.decode(msg.data)
                if envelope["event_id"] == event["event_id"]:
                    break
        assert msg.headers is not None
        assert trace_id_of(msg.headers["traceparent"]) == trace
        assert msg.headers["Nats-Msg-Id"] == event["event_id"]
    finally:
        await nc.close()
