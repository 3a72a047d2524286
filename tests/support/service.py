"""The appointments service run in the test's own process, for the fault tests.

:func:`running_service` runs the given roles on the real clock with the settings of a
deployment (``CLINIC_*`` variables), and hands back an HTTP client of its API;
:func:`running_notifications` runs the notification service beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import httpx

from services.appointments.bootstrap import appointments_container
from services.appointments.main import run_roles
from services.config import Settings, load_settings
from services.embedded import free_port
from services.notifications.main import run_notifications
from tests.support.notifications_process import FAST_TUNING

JWT_SECRET = "fault-tests-secret-that-is-long-enough-for-hs256"


def service_env(database_url: str, nats_urls: Sequence[str], **extra: str) -> dict[str, str]:
    """The ``CLINIC_*`` variables of a deployment on these servers."""
    return {
        "CLINIC_DATABASE_URL": database_url,
        "CLINIC_NATS_URL": ",".join(nats_urls),
        "CLINIC_JWT_SECRET": JWT_SECRET,
        "CLINIC_LOG_LEVEL": "INFO",
        **extra,
    }


async def wait_until_live(client: httpx.AsyncClient, seconds: float = 20.0) -> None:
    """Wait until the process answers ``/health/live``."""
    async with asyncio.timeout(seconds):
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health/live")).status_code == 200:
                    return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_service(
    env: Mapping[str, str], roles: Sequence[str] = ("api", "relay", "projector")
) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``roles`` of the appointments service; yield a client of its HTTP port."""
    port = free_port()
    settings = load_settings({**env, "CLINIC_HTTP_PORT": str(port)})
    stop = asyncio.Event()
    async with appointments_container(settings, pool_size=5) as container:
        running = asyncio.create_task(run_roles(container, roles, stop))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                await wait_until_live(client)
                yield client
        finally:
            stop.set()
            await asyncio.wait_for(running, 20)


@contextlib.asynccontextmanager
async def running_notifications(env: Mapping[str, str]) -> AsyncIterator[Settings]:
    """Run the notification service (with :data:`FAST_TUNING`) in this process."""
    settings = load_settings(dict(env))
    stop = asyncio.Event()
    running = asyncio.create_task(run_notifications(settings, stop, tuning=FAST_TUNING))
    try:
        yield settings
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
