"""Stopping the NATS service API drains it: every request already sent gets its reply."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
from nats.aio.msg import Msg

from contracts.subjects import CMD_SCHEDULE, QUERY_GET
from services.appointments.entrypoints.nats.service import DRAIN_SECONDS
from tests.e2e.nats_support import assert_ok, assert_problem, running_service

REQUESTS = 400


async def test_requests_on_the_wire_when_the_service_stops_are_all_answered(
    database_url: str, nats_url: str
) -> None:
    async with running_service(database_url, nats_url) as service:
        staff = service.actor("staff")
        inbox = service.nc.new_inbox()
        replies: dict[str, Msg] = {}
        all_in = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            replies[msg.subject] = msg
            if len(replies) == REQUESTS:
                all_in.set()

        await service.nc.subscribe(f"{inbox}.*", cb=on_reply)
        for number in range(REQUESTS):
            body = {"appointment_id": str(uuid.uuid4()), "actor": staff}
            await service.nc.publish(
                QUERY_GET, json.dumps(body).encode(), reply=f"{inbox}.{number}"
            )
        # The server has them all (routed to the service's subscription, most of them not
        # yet read by the service): stop now, as SIGTERM would.
        await service.nc.flush()
        service.stop.set()
        async with asyncio.timeout(30):
            await all_in.wait()
        assert len(replies) == REQUESTS
        for msg in replies.values():
            assert_problem(msg, 404, "not-found")


async def test_a_request_the_database_holds_past_the_drain_is_answered_unavailable(
    database_url: str, nats_url: str
) -> None:
    async with running_service(database_url, nats_url) as service:
        staff = service.actor("staff")
        view = assert_ok(await service.request(CMD_SCHEDULE, service.schedule_body(staff)))
        body = {"appointment_id": view["appointment_id"], "actor": staff}
        blocker = await asyncpg.connect(database_url)
        locked = blocker.transaction()
        await locked.start()
        try:
            # The read waits on a lock for longer than the drain lasts (a database too
            # slow to answer: statements may take longer than the grace).
            await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            pending = asyncio.create_task(
                service.nc.request(QUERY_GET, json.dumps(body).encode(), timeout=DRAIN_SECONDS + 5)
            )
            await asyncio.sleep(0.5)  # accepted, waiting for the lock
            service.stop.set()
            reply = await pending
        finally:
            await locked.rollback()
            await blocker.close()
        doc = assert_problem(reply, 503, "unavailable")
        assert reply.headers and reply.headers.get("Retry-After") == "1", (reply.headers, doc)
