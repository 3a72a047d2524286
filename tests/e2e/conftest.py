"""The running service (every role of it) for end-to-end tests, driven over HTTP and NATS."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from contracts.common import Principal, Role
from services.appointments.bootstrap import appointments_container
from services.appointments.main import run_roles
from services.auth import mint_token
from services.config import ROLES, load_settings
from tests.support.clock import ManualClock

JWT_SECRET = "e2e-test-secret-that-is-long-enough-for-hs256"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Api:
    """A running appointments service: its URL, its clock, and a client."""

    base_url: str
    clock: ManualClock
    client: httpx.AsyncClient
    clinic_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def principal(self, role: Role, clinic_id: uuid.UUID | None = None) -> Principal:
        return Principal(id=uuid.uuid4(), role=role, clinic_id=clinic_id or self.clinic_id)

    def auth(self, who: Principal, **extra: str) -> dict[str, str]:
        token = mint_token(JWT_SECRET, who.role, who.id, who.clinic_id)
        return {"Authorization": f"Bearer {token}", **extra}


async def wait_until_live(client: httpx.AsyncClient, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while True:
            try:
                if (await client.get("/health/live")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.02)


async def wait_until_ready(client: httpx.AsyncClient, seconds: float = 30.0) -> None:
    """Wait until ``/health/ready`` answers 200 (a process is live before NATS answers)."""
    async with asyncio.timeout(seconds):
        while (await client.get("/health/ready")).status_code != 200:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(database_url: str, nats_url: str) -> AsyncIterator[Api]:
    port = free_port()
    settings = load_settings(
        {
            "CLINIC_DATABASE_URL": database_url,
            "CLINIC_NATS_URL": nats_url,
            "CLINIC_JWT_SECRET": JWT_SECRET,
            "CLINIC_HTTP_PORT": str(port),
            "CLINIC_CONSISTENCY_WAIT_MS": "5000",
        }
    )
    clock = ManualClock()
    stop = asyncio.Event()
    async with appointments_container(settings, clock=clock, pool_size=5) as container:
        running = asyncio.create_task(run_roles(container, ROLES, stop))
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            await wait_until_live(client)
            yield Api(base_url=base_url, clock=clock, client=client)
        stop.set()
        await running
