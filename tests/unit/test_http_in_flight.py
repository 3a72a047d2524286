"""Past its limit of requests in progress a process answers the next 503 at once: a stall
(a locked table, a gateway retrying) must not grow it until it is killed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from services.ops import InFlightLimit


class Held:
    """An ASGI app whose requests wait until released, then answer 200."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def request(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("a refused request's body is never read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/v1/appointments"}, receive, send)
    return sent


async def test_past_the_limit_the_next_request_is_answered_503_before_its_body() -> None:
    held = Held()
    limited = InFlightLimit(held, limit=2)
    working = [asyncio.ensure_future(request(limited)) for _ in range(2)]
    await asyncio.sleep(0)
    assert held.entered == 2
    start, body = await asyncio.wait_for(request(limited), 1)  # not held: refused at once
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
    assert json.loads(body["body"])["code"] == "unavailable"
    assert held.entered == 2
    held.release.set()
    for done in await asyncio.gather(*working):
        assert done[0]["status"] == 200
    assert (await request(limited))[0]["status"] == 200  # room again
    assert held.entered == 3
