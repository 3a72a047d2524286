"""A request still waiting on a hung dependency when the HTTP server's graceful shutdown
runs out is answered 503 (problem+json), not uvicorn's 500."""

from __future__ import annotations

import asyncio
import logging

import httpx
import msgspec
import pytest
from litestar import Litestar, get

from services import ops
from services.embedded import free_port


async def test_a_request_cut_short_by_the_shutdown_is_answered_503(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ops, "SHUTDOWN_GRACE_SECONDS", 1.0)
    entered = asyncio.Event()

    @get("/hang")
    async def hang() -> str:  # a database that accepts and never answers
        entered.set()
        await asyncio.Event().wait()
        return "never"

    @get("/quick")
    async def quick() -> str:
        return "fine"

    port, stop = free_port(), asyncio.Event()
    server = asyncio.create_task(ops.serve_asgi(Litestar([hang, quick]), "127.0.0.1", port, stop))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for _ in range(100):
            try:
                assert (await client.get("/quick")).text == "fine"
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
        with caplog.at_level(logging.INFO):
            pending = asyncio.create_task(client.get("/hang"))
            await asyncio.wait_for(entered.wait(), 5)
            stop.set()
            answer = await asyncio.wait_for(pending, 8)
            await asyncio.wait_for(server, 10)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == "1"
    assert msgspec.json.decode(answer.content)["code"] == "unavailable"
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
