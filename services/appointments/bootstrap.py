"""The composition root of the appointments service: the only place adapters are chosen."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from nats.aio.client import Client as NATS

from services.appointments.adapters.postgres.event_store import PostgresEventStore
from services.appointments.adapters.postgres.visits import PostgresVisits, ViewUpdates
from services.appointments.adapters.system import new_uuid, utc_now
from services.appointments.relay import OutboxDoorbell, RingingEventStore
from services.appointments.service_layer.handlers import Appointments
from services.appointments.service_layer.ports import Clock
from services.appointments.service_layer.visits import VisitsQuery
from services.auth import TokenVerifier
from services.config import Settings

log = logging.getLogger(__name__)


@dataclass
class Container:
    """Everything a process of the appointments service runs on."""

    settings: Settings
    pool: asyncpg.Pool
    nats: NATS | None
    appointments: Appointments
    visits: VisitsQuery
    verifier: TokenVerifier
    doorbell: OutboxDoorbell | None = None
    """Appends ring it; a relay of this process attaches to it (else it sends NOTIFY)."""
    view_updates: ViewUpdates | None = None
    """A projector of this process announces written rows there; reads wait on it."""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset that skips asyncpg's reset query (an extra round trip per checkout).

    asyncpg still rolls back an open transaction on release. Nothing on these pools holds
    session state: the relay's advisory lock and LISTEN live on a pool of its own
    (:func:`create_session_pool`)."""


async def create_pool(dsn: str, max_size: int = 10) -> asyncpg.Pool:
    """A connection pool that starts even while PostgreSQL is down (readiness says so)."""
    pool = await asyncpg.create_pool(
        dsn, min_size=0, max_size=max_size, command_timeout=10, timeout=2, reset=_keep_session
    )
    assert pool is not None
    return pool


async def create_session_pool(dsn: str, max_size: int = 2) -> asyncpg.Pool:
    """A pool whose connections are fully reset on release (locks, LISTEN, settings), for
    work that holds session state: the relay's leadership lock."""
    pool = await asyncpg.create_pool(
        dsn, min_size=0, max_size=max_size, command_timeout=10, timeout=2
    )
    assert pool is not None
    return pool


class StoppedWhileConnecting(Exception):
    """The stop signal came before NATS answered: the process ends without having run."""


async def connect_nats(settings: Settings, name: str, stop: asyncio.Event | None = None) -> NATS:
    """A NATS connection that reconnects forever; waits (logging) while NATS is down at start.

    Raises :class:`StoppedWhileConnecting` if ``stop`` is set before NATS answers."""
    connecting = asyncio.create_task(_connect_nats(settings, name), name="nats connect")
    if stop is None:
        return await connecting
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([connecting, stopping], return_when="FIRST_COMPLETED")
    finally:
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            # The task closes its half-built client itself on the way out.
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    if connecting.cancelled():
        raise StoppedWhileConnecting("stopped while waiting for NATS")
    return connecting.result()


async def _connect_nats(settings: Settings, name: str) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    async def on_disconnected() -> None:
        if not (client.is_closed or client.is_draining):
            log.warning("nats disconnected")

    async def on_reconnected() -> None:
        log.info("nats reconnected")

    delay = 0.2
    while True:
        client = NATS()
        try:
            await client.connect(
                servers=settings.nats_urls,
                name=name,
                connect_timeout=2,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
            return client
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)
            raise
        except Exception as exc:  # nats-py raises several unrelated types here
            log.warning("nats unreachable, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


@asynccontextmanager
async def appointments_container(
    settings: Settings,
    clock: Clock = utc_now,
    with_nats: bool = True,
    pool_size: int = 10,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[Container]:
    """Build the container, and close its pool and NATS connection on exit. ``stop`` set
    while NATS is awaited raises :class:`StoppedWhileConnecting`."""
    pool = await create_pool(settings.require_database_url(), pool_size)
    try:
        nc = await connect_nats(settings, "appointments", stop) if with_nats else None
    except BaseException:
        await pool.close()
        raise
    store = PostgresEventStore(pool)
    # Appends ring the relay awake right after they commit (never inside the transaction):
    # in-process while a relay of this process leads, by NOTIFY otherwise.
    doorbell = OutboxDoorbell(pool)
    ringing = RingingEventStore(store, doorbell)
    updates = ViewUpdates()
    view = PostgresVisits(pool, updates=updates)
    wait = timedelta(milliseconds=settings.consistency_wait_ms)
    try:
        yield Container(
            settings=settings,
            pool=pool,
            nats=nc,
            appointments=Appointments(ringing, store, clock, new_uuid, settings.rules),
            visits=VisitsQuery(view, clock, settings.rules, wait, repair=(store, view)),
            verifier=TokenVerifier.from_settings(settings),
            doorbell=doorbell,
            view_updates=updates,
        )
    finally:
        try:
            if nc is not None:
                await close_nats(nc)
        finally:
            await pool.close()


async def close_nats(nc: NATS) -> None:
    """Drain the connection (finishing in-flight work), or just close it if NATS is gone.
    Never raises: a process stopping while NATS is away still stops cleanly."""
    try:
        await nc.drain()
    except Exception as exc:  # draining needs a live server
        log.info("nats drain failed (%s); closing", exc or type(exc).__name__)
        # After a failed drain, close may raise too (the client is half torn down).
        with contextlib.suppress(Exception):
            await nc.close()
