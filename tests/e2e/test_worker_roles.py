"""A process without the api role still answers health probes and serves its metrics."""

from __future__ import annotations

import asyncio

import httpx

from services.appointments.bootstrap import appointments_container
from services.appointments.main import run_roles
from services.config import load_settings
from services.embedded import EmbeddedNats
from tests.e2e.conftest import free_port, wait_until_live


async def test_relay_and_projector_process_serves_health_and_metrics_only(
    database_url: str, nats_url: str
) -> None:
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_HTTP_PORT": str(port),
        }
    )
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=3) as container:
        running = asyncio.create_task(run_roles(container, ["relay", "projector"], stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_live(client)
            assert (await client.get("/health/ready")).json() == {"status": "ready"}
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200 and "clinic_relay_backlog_events" in metrics.text
            assert (await client.get("/v1/visits")).status_code == 404  # no API here
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_ready_is_503_with_retry_after_while_postgresql_is_unreachable(nats_url: str) -> None:
    port = free_port()
    dead = free_port()  # nothing listens there
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{dead}/none",
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_JWT_SECRET": "x" * 40,
        }
    )
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=2) as container:
        running = asyncio.create_task(run_roles(container, ["api"], stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_live(client)
            ready = await client.get("/health/ready")
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            assert ready.json()["code"] == "unavailable" and "postgresql" in ready.json()["detail"]
        stop.set()
        await asyncio.wait_for(running, 10)


async def test_ready_is_503_while_nats_is_unreachable_and_ready_again_after(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_server.url,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_JWT_SECRET": "x" * 40,
        }
    )
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=2) as container:
        running = asyncio.create_task(run_roles(container, ["api"], stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_until_live(client)
            assert (await client.get("/health/ready")).status_code == 200
            nats_server.stop()
            ready = await _eventually_status(client, 503)
            assert ready.headers["retry-after"] == "1"
            assert ready.json()["code"] == "unavailable" and "nats" in ready.json()["detail"]
            assert "postgresql" not in ready.json()["detail"]
            nats_server.start()
            await _eventually_status(client, 200)  # the client reconnects by itself
        stop.set()
        await asyncio.wait_for(running, 10)


async def _eventually_status(client: httpx.AsyncClient, status: int) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        answer = await client.get("/health/ready")
        if answer.status_code == status:
            return answer
        assert asyncio.get_running_loop().time() < deadline, answer.text
        await asyncio.sleep(0.1)
