"""A request's body is waited for a while at most (408), a malformed request is answered
400 as a problem document, and a request whose client goes away mid-body is counted 499,
not as a 500 of the service's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from litestar import Litestar, Request, get, post
from prometheus_client import REGISTRY

from services import ops
from services.appointments.entrypoints.http.problems import EXCEPTION_HANDLERS
from services.embedded import free_port

BODY = b'{"reason": "' + b"r" * 80 + b'"}'


@post("/echo", status_code=200)
async def echo(request: Request) -> bytes:  # type: ignore[type-arg]
    return await request.body()


@post("/slow", status_code=200)
async def slow(request: Request) -> bytes:  # type: ignore[type-arg]
    await asyncio.sleep(1.5)  # a dependency before the body is read, past the body's bound
    return await request.body()


@get("/quick")
async def quick() -> str:
    return "fine"


@contextlib.asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(ops, "BODY_TIMEOUT_SECONDS", 1.0)
    port, stop = free_port(), asyncio.Event()
    app = Litestar([echo, slow, quick], exception_handlers=EXCEPTION_HANDLERS, logging_config=None)
    server = asyncio.create_task(ops.serve_asgi(app, "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(10):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/quick")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def exchange(port: int, parts: list[bytes], pause: float = 0.0) -> bytes:
    """What the server answers ``parts`` sent ``pause`` s apart, until it closes (10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        answer = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65_536):
                answer += chunk
        return answer
    finally:
        writer.close()


def counted(status: int) -> float:
    value = REGISTRY.get_sample_value(
        "clinic_http_requests_total", {"method": "POST", "route": "/echo", "status": str(status)}
    )
    return value or 0.0


def problem_of(answer: bytes) -> tuple[bytes, dict[str, object]]:
    status, _, rest = answer.partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head, answer[:300]
    return status, msgspec.json.decode(body)


HEAD = f"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {len(BODY)}\r\n\r\n".encode()
CHUNKED = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "parts",
    [[HEAD + BODY[:20]], [HEAD, BODY[:20]], [CHUNKED + b"10\r\nabc"]],
    ids=["with-its-head", "after-its-head", "chunked"],
)
async def test_a_body_that_stops_coming_is_refused_408_and_counted_so(
    parts: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(monkeypatch) as port:
        before = counted(408), counted(500)
        began = time.monotonic()
        answer = await exchange(port, parts, pause=0.05)
        waited = time.monotonic() - began
        status, doc = problem_of(answer)
        assert status == b"HTTP/1.1 408 Request Timeout", answer[:300]
        assert doc["status"] == 408 and "body" in str(doc["detail"]), doc
        assert 0.9 < waited < 6, waited
        for _ in range(100):  # the app's own task ends after the answer
            if counted(408) == before[0] + 1:
                break
            await asyncio.sleep(0.02)
        assert (counted(408), counted(500)) == (before[0] + 1, before[1])


async def test_a_slow_body_that_comes_within_the_bound_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(monkeypatch) as port:
        halves = [HEAD, BODY[:40], BODY[40:]]
        answer = await exchange(
            port, [p.replace(b"HTTP/1.1\r\n", b"HTTP/1.0\r\n") for p in halves], 0.25
        )  # half the bound in all: a loaded machine's stalls have room
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert answer.endswith(BODY)


async def test_a_connection_an_answer_left_with_a_body_still_dripping_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/quick`` answers without reading a body; the body never ends: no connection kept."""
    async with serving(monkeypatch) as port:
        head = b"GET /quick HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
        began = time.monotonic()
        answer = await exchange(port, [head + b"x" * 10])
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert time.monotonic() - began < 6


async def test_a_client_gone_mid_body_is_counted_499_not_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(monkeypatch) as port:
        before = counted(499), counted(500)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD + BODY[:20])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        for _ in range(200):
            if counted(499) == before[0] + 1:
                break
            await asyncio.sleep(0.02)
        assert (counted(499), counted(500)) == (before[0] + 1, before[1])


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n",  # not a chunk size
        b"GET /quick HTTP/1.1\r\nhost: x\r\nx-bad: a\x00b\r\n\r\n",
        # URLs httptools takes in, then cannot parse once the head is complete.
        b"GET http://a:99999/quick HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET http://[::1/quick HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /quick?x=" + b"a" * 65_600 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
    ],
    ids=[
        "two-lengths",
        "bad-chunk-size",
        "nul-in-a-header",
        "bad-port",
        "bad-host",
        "url-past-64k",
    ],
)
async def test_malformed_http_is_answered_400_as_a_problem_document(
    request_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(monkeypatch) as port:
        status, doc = problem_of(await exchange(port, [request_bytes]))
        assert status == b"HTTP/1.1 400 Bad Request", (status, doc)
        assert doc["code"] == "invalid-request", doc


async def test_a_malformed_url_after_an_answered_request_is_answered_400_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(10):
                writer.write(b"GET /quick HTTP/1.1\r\nhost: x\r\n\r\n")
                first = await reader.readuntil(b"fine")  # answered whole before the next
                writer.write(b"GET http://a:b/ HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = await reader.read()
        finally:
            writer.close()
        assert first.startswith(b"HTTP/1.1 200"), first
        status, doc = problem_of(answer)
        assert status == b"HTTP/1.1 400 Bad Request", (status, doc)


async def test_a_chunked_body_of_one_byte_chunks_past_the_framing_bound_is_answered_413(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(monkeypatch) as port:
        chunks = b"1\r\nx\r\n" * 20_000  # 20 kB of body in 120 kB of framing
        answer = await exchange(
            port, [CHUNKED, *(chunks[i : i + 8192] for i in range(0, len(chunks), 8192))]
        )
        status, doc = problem_of(answer)
        assert status == b"HTTP/1.1 413 Content Too Large", (status, doc)


async def test_a_client_waiting_for_100_continue_is_not_taken_for_a_slow_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The body is not sent before the app asks for it; the app takes its time."""
    async with serving(monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = f"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: {len(BODY)}\r\n"
            writer.write(head.encode() + b"expect: 100-continue\r\nconnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                interim = await reader.readuntil(b"\r\n\r\n")
                assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
                writer.write(BODY)
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_refusal_of_an_expect_100_continue_request_is_its_only_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(monkeypatch) as port:
        expecting = CHUNKED.replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n")
        answer = await exchange(port, [expecting + b"zz\r\nhello\r\n0\r\n\r\n"])
        status, doc = problem_of(answer)
        assert status == b"HTTP/1.1 400 Bad Request", (status, doc)
        await asyncio.sleep(0.2)  # the app's task, which reads the end of the request
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
