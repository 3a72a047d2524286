"""A process without the api role still answers health probes and serves its metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from services.appointments.bootstrap import Container, appointments_container
from services.appointments.main import run_roles
from services.auth import mint_token
from services.config import load_settings
from services.embedded import EmbeddedNats
from tests.e2e.conftest import free_port, wait_until_live

#: The token secret of the processes these tests run.
SECRET = "x" * 40


@contextlib.asynccontextmanager
async def serving(
    database_url: str, nats_url: str, roles: list[str], pool_size: int = 3
) -> AsyncIterator[tuple[httpx.AsyncClient, Container]]:
    """``roles`` of the appointments service in this process; a client of its HTTP port,
    and the process's container."""
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_JWT_SECRET": SECRET,
        }
    )
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=pool_size) as container:
        running = asyncio.create_task(run_roles(container, roles, stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await wait_until_live(client)
            yield client, container
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_relay_and_projector_process_serves_health_and_metrics_only(
    database_url: str, nats_url: str
) -> None:
    async with serving(database_url, nats_url, ["relay", "projector"]) as (client, _):
        assert (await client.get("/health/ready")).json() == {"status": "ready"}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200 and "clinic_relay_backlog_events" in metrics.text
        assert (await client.get("/v1/visits")).status_code == 404  # no API here


async def test_ready_is_503_with_retry_after_while_postgresql_is_unreachable(nats_url: str) -> None:
    dead = free_port()  # nothing listens there
    unreachable = f"postgresql://postgres@127.0.0.1:{dead}/none"
    async with serving(unreachable, nats_url, ["api"]) as (client, _):
        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert ready.json()["code"] == "unavailable" and "postgresql" in ready.json()["detail"]


async def test_ready_is_503_while_nats_is_unreachable_and_ready_again_after(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with serving(database_url, nats_server.url, ["api"]) as (client, _):
        assert (await client.get("/health/ready")).status_code == 200
        nats_server.stop()
        ready = await _eventually_status(client, 503)
        assert ready.headers["retry-after"] == "1"
        assert ready.json()["code"] == "unavailable" and "nats" in ready.json()["detail"]
        assert "postgresql" not in ready.json()["detail"]
        nats_server.start()
        await _eventually_status(client, 200)  # the client reconnects by itself


async def _eventually_status(client: httpx.AsyncClient, status: int) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        answer = await client.get("/health/ready")
        if answer.status_code == status:
            return answer
        assert asyncio.get_running_loop().time() < deadline, answer.text
        await asyncio.sleep(0.1)


async def test_with_the_pool_busy_readiness_holds_and_requests_get_503_in_2_s(
    database_url: str,
    nats_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A loaded process, or one whose queries wait for a table an operator locked, stays
    ready (readiness asks through a connection of its own) and answers what it cannot serve
    with a quick 503, not after the lock."""
    token = mint_token(SECRET, "patient", uuid.uuid4(), uuid.uuid4())
    caplog.set_level(logging.WARNING, logger="services.unavailable")
    async with serving(database_url, nats_url, ["api"], pool_size=1) as (client, container):
        busy = asyncio.ensure_future(container.pool.execute("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)  # it holds the pool's only connection
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        scraped = (await client.get("/metrics")).text  # what an operator sees of it
        assert 'clinic_db_pool_connections{pool="appointments",state="busy"} 1.0' in scraped
        assert 'clinic_db_pool_max_connections{pool="appointments"} 1.0' in scraped
        began = time.monotonic()
        visits = await client.get("/v1/visits", headers={"Authorization": f"Bearer {token}"})
        waited = time.monotonic() - began
        assert visits.status_code == 503, visits.text
        assert visits.headers["retry-after"] and "busy" in visits.json()["detail"]
        assert waited < 4, waited  # not until the busy query ends (5 s)
        answered = [r for r in caplog.records if r.name == "services.unavailable"]
        assert answered and "busy" in answered[0].getMessage()  # said, not only counted
        await busy


async def test_reads_stalled_on_a_locked_view_leave_connections_to_the_commands(
    database_url: str, nats_url: str
) -> None:
    """A bulkhead: the visits view's queries (and the event store's) take at most all but
    two of the pool's connections, so that an operator's lock on one side leaves the other
    its connections."""
    me, clinic = uuid.uuid4(), uuid.uuid4()
    auth = {"Authorization": f"Bearer {mint_token(SECRET, 'patient', me, clinic)}"}
    holder = await asyncpg.connect(database_url)
    try:
        async with serving(database_url, nats_url, ["api"], pool_size=4) as (client, _):
            locked = holder.transaction()
            await locked.start()
            await holder.execute("LOCK TABLE visits IN ACCESS EXCLUSIVE MODE")
            reads = [
                asyncio.ensure_future(client.get("/v1/visits", headers=auth)) for _ in range(6)
            ]
            await asyncio.sleep(0.3)  # every read is waiting: for the lock, or for its turn
            began = time.monotonic()
            booked = await client.post(
                "/v1/appointments",
                headers=auth,
                json={
                    "patient_id": str(me),
                    "provider_id": str(uuid.uuid4()),
                    "starts_at": (datetime.now(UTC) + timedelta(hours=2)).isoformat(),
                    "duration_minutes": 30,
                    "timezone": "UTC",
                },
            )
            waited = time.monotonic() - began
            assert booked.status_code == 201, booked.text
            assert waited < 1.5, waited  # not behind the reads' lock waits (2 s each)
            answers = await asyncio.gather(*reads)
            assert {answer.status_code for answer in answers} == {503}  # lock_timeout, or turn
            await locked.rollback()
    finally:
        await holder.close()
