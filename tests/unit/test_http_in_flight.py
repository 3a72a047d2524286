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


async def request(
    app: Any, path: str = "/v1/appointments", body: list[bytes] | None = None
) -> list[dict[str, Any]]:
    """What ``app`` sends for a request of ``path`` whose body comes in ``body``'s parts."""
    sent: list[dict[str, Any]] = []
    parts = list(body or [b"{}"])

    async def receive() -> dict[str, Any]:
        if not parts:
            await asyncio.Event().wait()  # a client that sends no more
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message: dict[str, Any]) -> None:
        if message.get("status") == 503:  # a refusal closes: unread data would reset it
            assert not parts, "refused with the body still unread"
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path}, receive, send)
    return sent


async def test_past_the_limit_the_next_request_is_answered_503_before_its_body() -> None:
    held = Held()
    limited = InFlightLimit(held, limit=2)
    working = [asyncio.ensure_future(request(limited)) for _ in range(2)]
    await asyncio.sleep(0)
    assert held.entered == 2
    chunks = [b"x" * 16_384] * 4  # read and dropped before the answer
    start, body = await asyncio.wait_for(request(limited, body=chunks), 1)  # not held
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


async def test_the_probes_and_the_scrape_are_served_past_the_limit() -> None:
    held = Held()
    limited = InFlightLimit(held, limit=0)
    held.release.set()
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await request(limited, path))[0]["status"] == 200, path
    assert (await request(limited, "/v1/visits"))[0]["status"] == 503


async def test_a_body_that_never_ends_is_drained_for_a_second_at_most() -> None:
    limited = InFlightLimit(Held(), limit=0)
    endless = [b"x" * 1024] * 10 + []  # then nothing more comes
    sent: list[dict[str, Any]] = []
    parts = list(endless)

    async def receive() -> dict[str, Any]:
        if not parts:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": parts.pop(0), "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/appointments"}
    await asyncio.wait_for(limited(scope, receive, send), 3)
    assert sent[0]["status"] == 503
