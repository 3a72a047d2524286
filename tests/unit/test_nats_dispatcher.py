"""The NATS dispatcher: each request in a task of its own, bounded per endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

from contracts.service_api import ENDPOINTS
from services.appointments.entrypoints.nats.handlers import ServiceApi
from services.appointments.entrypoints.nats.replies import Reply
from services.appointments.entrypoints.nats.service import Dispatcher


class _Api:
    """Answers every endpoint at once but ``visits``, which waits for ``release`` (unless
    asked ``at once``, as a query without a consistency token)."""

    def __init__(self) -> None:
        self.calls = {endpoint.name: None for endpoint in ENDPOINTS}
        self.release = asyncio.Event()

    async def answer(self, endpoint: str, data: bytes, headers: Mapping[str, str] | None) -> Reply:
        if endpoint == "visits" and data != b"at once":
            await self.release.wait()
        return Reply(data=endpoint.encode())


class _Request:
    def __init__(self, data: bytes = b"{}") -> None:
        self.data = data
        self.headers: dict[str, str] = {}
        self.answered = asyncio.Event()
        self.replies: list[Any] = []

    async def respond(self, data: bytes, headers: Any = None) -> None:
        self.replies.append(headers or {})
        self.answered.set()


async def test_waiting_visits_queries_do_not_hold_up_a_cancel() -> None:
    api = _Api()
    dispatcher = Dispatcher(cast(ServiceApi, api), max_in_flight=2)
    visits = [_Request() for _ in range(5)]  # more than the slots of one endpoint
    for request in visits:
        await dispatcher.handler("visits")(request)  # type: ignore[arg-type]
    cancel = _Request()
    await dispatcher.handler("cancel")(cancel)  # type: ignore[arg-type]
    await asyncio.wait_for(cancel.answered.wait(), 1)
    assert not any(request.answered.is_set() for request in visits)
    api.release.set()
    await asyncio.wait_for(asyncio.gather(*(r.answered.wait() for r in visits)), 1)
    assert await dispatcher.drain(1) == 0


async def test_requests_past_the_accepted_limit_are_refused_once_until_there_is_room() -> None:
    api = _Api()
    dispatcher = Dispatcher(cast(ServiceApi, api), max_accepted=1)
    held, refused = _Request(), _Request()
    await dispatcher.handler("visits")(held)  # type: ignore[arg-type]
    await dispatcher.handler("visits")(refused)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert len(refused.replies) == 1  # answered once, as overloaded
    assert refused.replies[0]["Nats-Service-Error-Code"] == "503"
    assert not held.answered.is_set()
    api.release.set()
    await asyncio.wait_for(held.answered.wait(), 1)
    await asyncio.sleep(0)  # the finished task leaves the accepted ones
    later = _Request()
    await dispatcher.handler("visits")(later)  # type: ignore[arg-type]
    await asyncio.wait_for(later.answered.wait(), 1)
    assert later.replies[0].get("Nats-Service-Error-Code") is None
    assert await dispatcher.drain(1) == 0


async def test_waiting_visits_queries_do_not_take_the_place_of_other_visits_queries() -> None:
    api = _Api()
    dispatcher = Dispatcher(cast(ServiceApi, api), max_in_flight=2)
    waiting = [_Request() for _ in range(5)]  # consistency tokens nobody will reach, say
    for request in waiting:
        await dispatcher.handler("visits")(request)  # type: ignore[arg-type]
    plain = _Request(b"at once")
    await dispatcher.handler("visits")(plain)  # type: ignore[arg-type]
    await asyncio.wait_for(plain.answered.wait(), 1)
    assert not any(request.answered.is_set() for request in waiting)
    api.release.set()
    assert await dispatcher.drain(1) == 0


async def test_a_flood_of_one_endpoint_does_not_refuse_another() -> None:
    api = _Api()
    dispatcher = Dispatcher(cast(ServiceApi, api), max_accepted=2)
    flood = [_Request() for _ in range(3)]
    for request in flood:
        await dispatcher.handler("visits")(request)  # type: ignore[arg-type]
    assert flood[2].replies[0]["Nats-Service-Error-Code"] == "503"  # visits are full
    cancel = _Request()
    await dispatcher.handler("cancel")(cancel)  # type: ignore[arg-type]
    await asyncio.wait_for(cancel.answered.wait(), 1)
    assert cancel.replies[0].get("Nats-Service-Error-Code") is None
    api.release.set()
    assert await dispatcher.drain(1) == 0


async def test_a_request_unfinished_when_the_drain_ends_is_answered_unavailable() -> None:
    api = _Api()
    dispatcher = Dispatcher(cast(ServiceApi, api))
    stuck = _Request()
    await dispatcher.handler("visits")(stuck)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert await dispatcher.drain(0.05) == 1
    assert len(stuck.replies) == 1
    assert stuck.replies[0]["Nats-Service-Error-Code"] == "503"
