"""Stopping the NATS service API drains it: every request already sent gets its reply."""

from __future__ import annotations

import asyncio
import json
import uuid

from nats.aio.msg import Msg

from contracts.subjects import QUERY_GET
from tests.e2e.nats_support import assert_problem, running_service

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
