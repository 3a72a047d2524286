"""``/health/ready`` is 503 until the database has the schema this code needs: a process
started against an unmigrated (or older) database must not take traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from services import ops
from services.appointments.adapters.postgres.migrate import migration_files
from services.embedded import free_port
from services.logs import CLIENT_CAUSED, throttle_client_noise
from services.ops import Probes, serve_ops
from tests.support.service import wait_until_live


@contextlib.asynccontextmanager
async def serving(probes: Probes) -> AsyncIterator[httpx.AsyncClient]:
    """The operations endpoints on a free port, and a client of them."""
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_ops(probes, "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_live(client)
            yield client
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_ready_is_503_naming_the_schema_when_nothing_is_migrated(
    empty_schema_pool: asyncpg.Pool,
) -> None:
    async with serving(Probes(empty_schema_pool, None)) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert "schema not migrated" in ready.json()["detail"]


async def test_ready_is_503_until_the_newest_migration_is_applied(pool: asyncpg.Pool) -> None:
    newest = migration_files()[-1][0]
    applied = await pool.fetchval(
        "SELECT applied_at FROM schema_migrations WHERE name = $1", newest
    )
    await pool.execute("DELETE FROM schema_migrations WHERE name = $1", newest)  # an older schema
    probes = Probes(pool, None)
    assert any("schema" in reason and newest in reason for reason in await probes.failing())
    await pool.execute(
        "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2)", newest, applied
    )
    assert await probes.failing() == []


async def test_ready_is_200_on_a_migrated_database(pool: asyncpg.Pool) -> None:
    async with serving(Probes(pool, None)) as client:
        ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_the_operations_port_answers_errors_as_problems_like_the_api(
    pool: asyncpg.Pool,
) -> None:
    async with serving(Probes(pool, None)) as client:  # a process without the api role
        missing = await client.get("/v1/visits")
        wrong = await client.post("/health/live")
    for answer, status in ((missing, 404), (wrong, 405)):
        assert answer.status_code == status
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert {"type", "title", "status", "detail", "code"} <= set(answer.json())
    assert missing.json()["code"] == "not-found"


async def test_why_postgresql_fails_readiness_is_logged_once_and_kept_out_of_the_answer(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A pool whose every connection is refused: another database, one that does not exist.
    base, _, query = database_url.partition("?")
    missing = base.rpartition("/")[0] + "/no_such_database_here" + ("?" + query if query else "")
    pool = await asyncpg.create_pool(missing, min_size=0, max_size=1)
    try:
        async with serving(Probes(pool, None)) as client:
            answers = [await client.get("/health/ready") for _ in range(3)]
    finally:
        await pool.close()
    assert {a.status_code for a in answers} == {503}
    assert all("no_such_database_here" not in a.text for a in answers)  # the answer is public
    logged = [r.getMessage() for r in caplog.records if "readiness" in r.getMessage()]
    assert len(logged) == 1, logged  # not once per probe
    assert 'InvalidCatalogNameError: database "no_such_database_here" does not exist' in logged[0]


async def test_the_probes_answer_head_as_they_answer_get(
    pool: asyncpg.Pool, empty_schema_pool: asyncpg.Pool
) -> None:
    async with serving(Probes(pool, None)) as client:
        live, ready = await client.head("/health/live"), await client.head("/health/ready")
    assert (live.status_code, live.content) == (200, b"")
    assert (ready.status_code, ready.content) == (200, b"")
    async with serving(Probes(empty_schema_pool, None)) as client:
        ready = await client.head("/health/ready")
    assert (ready.status_code, ready.headers["retry-after"], ready.content) == (503, "1", b"")


async def _exchange(port: int, head: bytes, body: bytes = b"", chunk: int = 16_384) -> bytes:
    """Send a raw request (its head in ``chunk``-byte writes, as a slow client would) and
    read the answer until the server closes or answers in full."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(head), chunk):
                writer.write(head[start : start + chunk])
                await writer.drain()
            writer.write(body)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(65_536), 10)
    finally:
        writer.close()
    return answer


async def test_a_request_head_past_64_kib_is_refused_431_before_it_is_read_whole(
    pool: asyncpg.Pool,
) -> None:
    async with serving(Probes(pool, None)) as client:
        port = client.base_url.port
        assert port is not None
        filler = b"a" * 1024
        fine = b"GET /health/live HTTP/1.1\r\nhost: x\r\n" + b"x-some: " + filler * 16 + b"\r\n\r\n"
        assert (await _exchange(port, fine)).startswith(b"HTTP/1.1 200")
        # A body read with its head (one write) is no head, however long.
        big_body = b"b" * 200_000
        with_body = (
            b"GET /health/live HTTP/1.1\r\nhost: x\r\n"
            + f"content-length: {len(big_body)}\r\n\r\n".encode()
        )
        assert (await _exchange(port, with_body + big_body, chunk=1 << 20)).startswith(
            b"HTTP/1.1 200"
        )
        huge = b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: " + filler * 4096  # 4 MiB
        answer = await _exchange(port, huge)
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
        head, _, body = rest.partition(b"\r\n\r\n")
        assert b"content-type: application/problem+json" in head
        assert msgspec.json.decode(body)["code"] == "invalid-request"


async def test_malformed_requests_are_logged_once_a_minute_not_once_each(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    throttle = throttle_client_noise()  # as configure_logging installs it
    try:
        with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
            async with serving(Probes(pool, None)) as client:
                port = client.base_url.port
                assert port is not None
                for _ in range(20):
                    answer = await _exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
                    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    finally:
        logging.getLogger("uvicorn.error").removeFilter(throttle)
    told = [r for r in caplog.records if r.getMessage() == CLIENT_CAUSED[0]]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]


async def test_trailers_after_a_chunked_body_count_as_head(pool: asyncpg.Pool) -> None:
    async with serving(Probes(pool, None)) as client:
        port = client.base_url.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /health/live HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n"  # the body, then trailer fields that never end
            )
            closed = False
            with contextlib.suppress(ConnectionError):
                for _ in range(4096):  # 4 MiB of trailers
                    writer.write(b"x-trailer: " + b"t" * 1010 + b"\r\n")
                    await writer.drain()

            async def until_closed() -> None:
                while await reader.read(65_536):
                    pass

            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(until_closed(), 10)
            closed = True
        finally:
            writer.close()
        assert closed  # the server hung up instead of buffering them all and waiting on


async def test_a_head_dripped_slower_than_its_timeout_is_refused_408(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "HEAD_TIMEOUT_SECONDS", 1.0)
    async with serving(Probes(pool, None)) as client:
        port = client.base_url.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:  # an idle keep-alive connection between requests is no slow head
            for _ in range(2):
                writer.write(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(65_536), 10)
                assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
                await asyncio.sleep(1.5)
        finally:
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /health/live HTTP/1.1\r\nhost: x\r\n")  # never finished
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(65_536), 10)
        finally:
            writer.close()
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout", answer[:200]
        assert msgspec.json.decode(rest.partition(b"\r\n\r\n")[2])["status"] == 408


async def test_a_connection_that_never_sends_a_byte_is_closed_when_its_keep_alive_ends(
    pool: asyncpg.Pool,
) -> None:
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_ops(Probes(pool, None), "127.0.0.1", port, stop, 1))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_live(client)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:  # silent: uvicorn starts no timer before a first request
            assert await asyncio.wait_for(reader.read(1), 10) == b""  # closed by the server
        finally:
            writer.close()
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)


async def test_the_shipped_postgresql_config_names_only_real_settings(pool: asyncpg.Pool) -> None:
    conf = Path(__file__).parents[2] / "deploy" / "postgresql.conf"
    settings = {}
    for line in conf.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = line.partition("=")
            settings[name.strip().lower()] = value.strip().strip("'")
    names = await pool.fetch("SELECT lower(name) AS name FROM pg_settings")  # any case
    known = {row["name"] for row in names}
    assert settings and set(settings) <= known, set(settings) - known
    assert settings["synchronous_commit"] == "on" and settings["fsync"] == "on"


async def test_the_served_app_bounds_the_requests_in_progress(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ops, "MAX_REQUESTS_IN_FLIGHT", 0)  # every request is one too many
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve_ops(Probes(pool, None), "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):
                with contextlib.suppress(httpx.TransportError):
                    answer = await client.get("/health/live")  # always served
                    break
                await asyncio.sleep(0.05)
            assert answer.status_code == 200
            assert (await client.get("/metrics")).status_code == 200
            refused = await client.get("/anything/else")
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "unavailable"
    finally:
        stop.set()
        await asyncio.wait_for(server, 10)
