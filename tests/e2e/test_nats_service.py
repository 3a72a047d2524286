"""The NATS service API, end to end, driven as another clinic service drives it (nats-py).

Every endpoint's success path, read-your-writes through the visits query, discovery over
``$SRV``, the queue group, and parity with the HTTP answers.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from contracts.subjects import CMD_CANCEL, CMD_SCHEDULE, CMD_START, QUERY_GET, QUERY_VISITS
from services.auth import mint_token
from tests.e2e.conftest import JWT_SECRET
from tests.e2e.nats_support import NatsService, assert_ok, running_service


@pytest.fixture
async def service(database_url: str, nats_url: str) -> AsyncIterator[NatsService]:
    async with running_service(database_url, nats_url) as running:
        yield running


async def test_patient_schedules_reads_and_cancels_over_nats(service: NatsService) -> None:
    patient = service.actor("patient")
    scheduled = await service.request(
        CMD_SCHEDULE,
        service.schedule_body(patient),
        headers={"X-Correlation-Id": str(uuid.UUID(int=7))},
    )
    view = assert_ok(scheduled)
    assert scheduled.headers is not None
    assert scheduled.headers["ETag"] == '"1"'
    assert scheduled.headers["X-Consistency-Token"] == f"{view['appointment_id']}.1"
    assert scheduled.headers["X-Correlation-Id"] == str(uuid.UUID(int=7))
    assert view["status"] == "scheduled" and view["version"] == 1
    assert view["patient_id"] == patient["id"] and view["clinic_id"] == patient["clinic_id"]
    assert view["starts_at"].endswith("Z") and view["can_cancel"] is True

    key = {"appointment_id": view["appointment_id"], "actor": patient}
    read = await service.request(QUERY_GET, key)
    assert assert_ok(read) == view

    cancelled = assert_ok(
        await service.request(
            CMD_CANCEL, {**key, "reason": "Feeling better", "expected_version": 1}
        )
    )
    assert cancelled["status"] == "cancelled" and cancelled["version"] == 2
    assert cancelled["cancelled_by"] == {"id": patient["id"], "role": "patient"}
    assert cancelled["cancellation_reason"] == "Feeling better"

    again = assert_ok(await service.request(CMD_CANCEL, key))
    assert again == cancelled  # a double tap is a success without a new event


async def test_provider_starts_inside_the_window_and_a_second_start_answers_the_same(
    service: NatsService,
) -> None:
    provider = service.actor("provider")
    view = assert_ok(await service.request(CMD_SCHEDULE, service.schedule_body(provider)))
    service.clock.advance(hours=1, minutes=50)
    key = {"appointment_id": view["appointment_id"], "actor": provider}
    started = assert_ok(await service.request(CMD_START, {**key, "expected_version": 1}))
    assert started["status"] == "started" and started["version"] == 2
    assert started["started_at"] is not None
    assert assert_ok(await service.request(CMD_START, key)) == started


async def test_staff_schedules_with_a_chosen_id_and_an_exact_retry_gets_the_first_answer(
    service: NatsService,
) -> None:
    staff = service.actor("staff")
    appointment_id = str(uuid.uuid4())
    body = service.schedule_body(staff, appointment_id=appointment_id, idempotency_key="k-1")
    first = assert_ok(await service.request(CMD_SCHEDULE, body))
    retry = assert_ok(await service.request(CMD_SCHEDULE, body))
    assert first["appointment_id"] == appointment_id and retry == first


async def test_visits_read_your_writes_through_the_seed_flow(service: NatsService) -> None:
    patient = service.actor("patient")
    scheduled = await service.request(CMD_SCHEDULE, service.schedule_body(patient))
    view = assert_ok(scheduled)
    assert scheduled.headers is not None
    token = scheduled.headers["X-Consistency-Token"]

    upcoming = await service.request(QUERY_VISITS, {"actor": patient, "consistency_token": token})
    page = assert_ok(upcoming)
    assert "X-Consistency" not in (upcoming.headers or {})
    assert [v["appointment_id"] for v in page["items"]] == [view["appointment_id"]]
    assert page["items"][0]["status"] == "scheduled" and page["next_cursor"] is None

    cancelled = await service.request(
        CMD_CANCEL, {"appointment_id": view["appointment_id"], "actor": patient}
    )
    assert cancelled.headers is not None
    token = cancelled.headers["X-Consistency-Token"]
    after = assert_ok(
        await service.request(QUERY_VISITS, {"actor": patient, "consistency_token": token})
    )
    assert after["items"] == []
    past = assert_ok(await service.request(QUERY_VISITS, {"actor": patient, "tab": "past"}))
    assert [(v["appointment_id"], v["status"]) for v in past["items"]] == [
        (view["appointment_id"], "cancelled")
    ]


async def test_visits_pages_with_a_cursor(service: NatsService) -> None:
    staff = service.actor("staff")
    ids = []
    for hours in (2, 3, 4):
        starts_at = (service.clock.now + timedelta(hours=hours)).isoformat()
        reply = await service.request(
            CMD_SCHEDULE, service.schedule_body(staff, starts_at=starts_at)
        )
        ids.append(assert_ok(reply)["appointment_id"])
        assert reply.headers is not None
        # A token vouches for its own write only (its row may be repaired ahead of the
        # projector): read with each, so that all three are in the view before paging.
        token = reply.headers["X-Consistency-Token"]
        read = {"actor": staff, "limit": 2, "consistency_token": token}
        assert_ok(await service.request(QUERY_VISITS, read))
    first = assert_ok(await service.request(QUERY_VISITS, {"actor": staff, "limit": 2}))
    assert [v["appointment_id"] for v in first["items"]] == ids[:2] and first["next_cursor"]
    rest = assert_ok(
        await service.request(
            QUERY_VISITS, {"actor": staff, "limit": 2, "cursor": first["next_cursor"]}
        )
    )
    assert [v["appointment_id"] for v in rest["items"]] == ids[2:]
    assert rest["next_cursor"] is None


async def test_srv_ping_info_and_stats_discover_the_service(service: NatsService) -> None:
    ping = json.loads((await service.nc.request("$SRV.PING.appointments", b"", timeout=2)).data)
    assert ping["type"] == "io.nats.micro.v1.ping_response" and ping["name"] == "appointments"
    assert ping["version"] and ping["id"]

    info = json.loads((await service.nc.request("$SRV.INFO.appointments", b"", timeout=2)).data)
    endpoints = {e["subject"]: e for e in info["endpoints"]}
    assert set(endpoints) == {CMD_SCHEDULE, CMD_CANCEL, CMD_START, QUERY_GET, QUERY_VISITS}
    assert {e["queue_group"] for e in endpoints.values()} == {"appointments"}
    assert endpoints[CMD_SCHEDULE]["metadata"]["request_schema"] == "ScheduleRequest"
    assert endpoints[QUERY_VISITS]["metadata"]["reply_schema"] == "VisitsPage"
    assert info["description"] and info["metadata"]["api"] == "v1"

    await service.request(QUERY_GET, b"not json")
    stats = json.loads((await service.nc.request("$SRV.STATS.appointments", b"", timeout=2)).data)
    get = next(e for e in stats["endpoints"] if e["subject"] == QUERY_GET)
    assert get["num_requests"] == 1
    assert get["data"]["error_replies"] == 1 and get["data"]["last_error_status"] == "400"


async def test_a_reply_subject_that_is_no_inbox_is_neither_handled_nor_answered(
    service: NatsService, caplog: pytest.LogCaptureFixture
) -> None:
    # The caller picks the reply subject; NATS checks it against nobody's permissions, and
    # the service may publish on JetStream's API and on the event subjects.
    landed: list[str] = []

    async def land(msg: Msg) -> None:
        landed.append(msg.subject)

    await service.nc.subscribe("elsewhere.>", cb=land)
    patient = service.actor("patient")
    body = service.schedule_body(patient, appointment_id=str(uuid.uuid4()))
    sent = [
        (CMD_SCHEDULE, json.dumps(body).encode()),
        (QUERY_VISITS, json.dumps({"actor": patient}).encode()),
        ("$SRV.PING", b""),
        ("$SRV.INFO.appointments", b""),
        ("$SRV.STATS.appointments", b""),
    ]
    for subject, data in sent:
        await service.nc.publish(subject, data, reply=f"elsewhere.{subject}")
    for subject, data in sent[1:]:  # each subject's next request, with an inbox: answered
        assert (await service.nc.request(subject, data, timeout=5)).data

    assert landed == []
    gone = await service.request(
        QUERY_GET, {"appointment_id": body["appointment_id"], "actor": patient}
    )
    assert json.loads(gone.data)["code"] == "not-found"  # the booking was never made
    assert "reply subject is no inbox of a caller's" in caplog.text


async def test_instances_share_the_load_as_a_queue_group(database_url: str, nats_url: str) -> None:
    async with running_service(database_url, nats_url, instances=2) as service:
        staff = service.actor("staff")
        view = assert_ok(await service.request(CMD_SCHEDULE, service.schedule_body(staff)))
        key = {"appointment_id": view["appointment_id"], "actor": staff}
        replies = await asyncio.gather(*(service.request(QUERY_GET, key) for _ in range(40)))
        assert all(assert_ok(reply) == view for reply in replies)

        inbox = service.nc.new_inbox()
        subscription = await service.nc.subscribe(inbox)
        await service.nc.publish("$SRV.STATS.appointments", b"", reply=inbox)
        stats = [json.loads((await subscription.next_msg(timeout=2)).data) for _ in range(2)]
        served = [
            next(e for e in s["endpoints"] if e["subject"] == QUERY_GET)["num_requests"]
            for s in stats
        ]
        assert len({s["id"] for s in stats}) == 2
        assert sum(served) == 40 and min(served) > 0


async def test_replies_are_the_same_json_as_the_http_answers(
    database_url: str, nats_url: str
) -> None:
    async with running_service(database_url, nats_url, http=True) as service:
        assert service.http_url is not None
        staff = service.actor("staff")
        view = assert_ok(await service.request(CMD_SCHEDULE, service.schedule_body(staff)))
        token = mint_token(
            JWT_SECRET, "staff", uuid.UUID(staff["id"]), uuid.UUID(staff["clinic_id"])
        )
        auth = {"Authorization": f"Bearer {token}"}
        nats_reply = await service.request(
            QUERY_GET, {"appointment_id": view["appointment_id"], "actor": staff}
        )
        missing = await service.request(
            QUERY_GET, {"appointment_id": str(uuid.uuid4()), "actor": staff}
        )
        async with httpx.AsyncClient(base_url=service.http_url, timeout=10) as http:
            answer = await http.get(f"/v1/appointments/{view['appointment_id']}", headers=auth)
            not_found = await http.get(f"/v1/appointments/{uuid.uuid4()}", headers=auth)
        assert answer.status_code == 200 and nats_reply.data == answer.content
        assert json.loads(missing.data) == not_found.json()


async def in_flight(service: NatsService) -> int:
    reply = await service.nc.request("$SRV.STATS.appointments", b"", timeout=2)
    # Each endpoint's own requests: a visits query is in the visits endpoint's count.
    endpoints = json.loads(reply.data)["endpoints"]
    counts = {endpoint["name"]: endpoint["data"]["in_flight"] for endpoint in endpoints}
    assert counts["schedule"] == 0
    return int(counts["visits"])


async def test_stopping_answers_the_requests_already_accepted_then_leaves(
    database_url: str, nats_url: str
) -> None:
    async with running_service(database_url, nats_url, consistency_wait_ms=1500) as service:
        # A token of a write the view never sees: the query waits for its whole bound.
        query = {"actor": service.actor("staff"), "consistency_token": f"{uuid.uuid4()}.1"}
        pending = asyncio.create_task(service.request(QUERY_VISITS, query))
        async with asyncio.timeout(5):
            while True:
                if await in_flight(service):
                    break
                await asyncio.sleep(0.01)
        service.stop.set()
        reply = await pending
        assert assert_ok(reply) == {"items": [], "next_cursor": None}
        assert (reply.headers or {})["X-Consistency"] == "stale"
        with pytest.raises(NoRespondersError):
            await service.nc.request(QUERY_GET, b"{}", timeout=2)
