"""The NATS dispatcher: each request in a task of its own, bounded per endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import REGISTRY

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
        self.subject = "appointments.v1.test"
        self._msg = SimpleNamespace(reply="_INBOX.test")  # as micro's Request keeps it
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


class _SlowFirstCancel(_Api):
    """The first cancel waits for ``release``; the others are answered at once."""

    def __init__(self) -> None:
        super().__init__()
        self.cancels = 0

    async def answer(self, endpoint: str, data: bytes, headers: Mapping[str, str] | None) -> Reply:
        if endpoint == "cancel":
            self.cancels += 1
            if self.cancels == 1:
                await self.release.wait()
        return await super().answer(endpoint, data, headers)


async def test_the_request_histogram_counts_the_wait_for_a_slot_and_stats_do_not() -> None:
    api = _SlowFirstCancel()
    dispatcher = Dispatcher(cast(ServiceApi, api), max_in_flight=1)
    labels = {"endpoint": "cancel", "status": "200"}

    def observed() -> float:
        return REGISTRY.get_sample_value("clinic_nats_request_duration_seconds_sum", labels) or 0

    before = observed()
    holding, queued = _Request(), _Request()  # the second waits only for the slot
    await dispatcher.handler("cancel")(holding)  # type: ignore[arg-type]
    await dispatcher.handler("cancel")(queued)  # type: ignore[arg-type]
    hold = 0.2
    await asyncio.sleep(hold)
    api.release.set()
    await asyncio.wait_for(queued.answered.wait(), 1)
    assert observed() - before >= 2 * hold * 0.9  # both waited: the second for the first
    stats = dispatcher.stats(cast(Any, SimpleNamespace(name="cancel")))
    assert stats["average_processing_time"] < 0.75 * hold * 1e9  # the second's, ~0
    assert await dispatcher.drain(1) == 0
