"""The appointments service in a process of its own, for the HTTP benchmarks.

It is the product's app (``create_app`` over ``appointments_container``) served by uvicorn
as ``serve_http`` serves it, plus one route the product does not have:
``POST /bench/noop`` decodes a JSON body and answers a small JSON document without any
other work (the framework's ceiling on this machine). Other roles (``relay``,
``projector``) run beside it when asked, as ``clinic appointments`` runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
from litestar import post

from services.appointments.bootstrap import appointments_container, create_session_pool
from services.appointments.entrypoints.http.app import create_app
from services.appointments.main import settle_heap
from services.appointments.projector import run_projector
from services.appointments.relay import run_relay
from services.config import load_settings
from services.ops import serve_asgi

JWT_SECRET = "bench-secret-that-is-long-enough-for-hs256-tokens"


@post("/bench/noop", status_code=200, include_in_schema=False)
async def noop(data: dict[str, Any]) -> dict[str, str]:
    """The framework's work alone: route, decode the JSON body, encode an answer."""
    return {"status": "ok"}


async def _serve(env: Mapping[str, str], roles: Sequence[str]) -> None:
    settings = load_settings(env)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    needs_nats = bool({"relay", "projector"} & set(roles))
    async with appointments_container(settings, with_nats=needs_nats) as container:
        app = create_app(container)
        app.register(noop)
        settle_heap()  # as run_appointments does
        # Served as ``clinic appointments`` serves it (the bounded request head, 503 for a
        # request cut short by the shutdown).
        http = serve_asgi(
            app, settings.http_host, settings.http_port, stop, settings.http_keep_alive_seconds
        )
        tasks = [asyncio.create_task(http)]
        if "relay" in roles:
            # As ``clinic appointments`` runs it: its lock and LISTEN on a pool of their own.
            assert container.nats is not None
            relay_pool = await create_session_pool(settings.require_database_url())
            relay = run_relay(relay_pool, container.nats, stop, doorbell=container.doorbell)
            tasks.append(asyncio.create_task(relay))
        if "projector" in roles:
            assert container.nats is not None
            updates = container.view_updates
            projector = run_projector(container.pool, container.nats, stop, updates=updates)
            tasks.append(asyncio.create_task(projector))
        await stop.wait()
        await asyncio.gather(*tasks)
        if "relay" in roles:
            await relay_pool.close()


def _main(env: Mapping[str, str], roles: Sequence[str]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(env, roles))
    else:
        uvloop.run(_serve(env, roles))


@contextlib.contextmanager
def service_process(
    dsn: str,
    nats_url: str | None,
    port: int,
    roles: Sequence[str],
    name: str = "clinic-service",
) -> Iterator[str]:
    """Run the service in a child process until the block ends; yields its base URL."""
    env = {
        "CLINIC_DATABASE_URL": dsn,
        "CLINIC_JWT_SECRET": JWT_SECRET,
        "CLINIC_HTTP_PORT": str(port),
        "CLINIC_LOG_LEVEL": "WARNING",
    }
    if nats_url:
        env["CLINIC_NATS_URL"] = nats_url
    process = multiprocessing.get_context("spawn").Process(
        target=_main, args=(env, list(roles)), name=name, daemon=True
    )
    process.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/health/live").status_code == 200:
                    break
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        yield base_url
    finally:
        process.terminate()
        process.join(15)
        if process.is_alive():
            process.kill()
            process.join()
