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
    """Answers every endpoint at once but ``visits``, which waits for ``release``."""

    def __init__(self) -> None:
        self.calls = {endpoint.name: None for endpoint in ENDPOINTS}
        self.release = asyncio.Event()

    async def answer(self, endpoint: str, data: bytes, headers: Mapping[str, str] | None) -> Reply:
        if endpoint == "visits":
            await self.release.wait()
        return Reply(data=endpoint.encode())


class _Request:
    def __init__(self) -> None:
        self.data = b"{}"
        self.headers: dict[str, str] = {}
        self.answered = asyncio.Event()

    async def respond(self, data: bytes, headers: Any = None) -> None:
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
