"""Running the appointments service's roles (api, relay, projector) in one process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg

from services.appointments.adapters.postgres.pruning import run_pruner
from services.appointments.bootstrap import (
    Container,
    appointments_container,
    close_pool,
    create_session_pool,
)
from services.appointments.entrypoints.http.app import create_app
from services.appointments.entrypoints.nats.service import serve_nats
from services.appointments.projector import run_projector
from services.appointments.relay import STANDBY_SECONDS, observe_outbox, run_relay
from services.config import Settings, config_error_in
from services.metrics import RELAY_METRICS, exported, watch_pool
from services.ops import SHUTDOWN_GRACE_SECONDS, Probes, serve_asgi, serve_ops

T = TypeVar("T")

log = logging.getLogger(__name__)

#: How long a role cancelled after the shutdown grace has to unwind.
CANCEL_GRACE_SECONDS = 2.0
#: How long the roles have to stop once asked: a little more than their own limits (the
#: HTTP server's and the NATS service API's drains, SHUTDOWN_GRACE_SECONDS), so that those
#: run out first and the roles end on their own.
ROLE_GRACE_SECONDS = SHUTDOWN_GRACE_SECONDS + 1.5


async def serve_http(container: Container, stop: asyncio.Event) -> None:
    """Serve the HTTP API until ``stop`` is set, then drain in-flight requests."""
    settings = container.settings
    await serve_asgi(
        create_app(container),
        settings.http_host,
        settings.http_port,
        stop,
        settings.http_keep_alive_seconds,
    )


async def _ops(container: Container, stop: asyncio.Event) -> None:
    """Health and metrics for a process without the api role."""
    settings = container.settings
    probes = Probes(container.probe_pool, container.nats_link)
    await serve_ops(
        probes, settings.http_host, settings.http_port, stop, settings.http_keep_alive_seconds
    )


async def serve_api(container: Container, stop: asyncio.Event) -> None:
    """The ``api`` role: the HTTP API and the NATS service API side by side. One failing
    (the HTTP port taken, say) stops the other through ``stop``, so that it drains rather
    than being cancelled mid-drain."""
    settings = container.settings
    if not settings.jwt_secret and not settings.jwt_public_key_file:
        log.warning(
            "no token key is configured (CLINIC_JWT_SECRET or CLINIC_JWT_PUBLIC_KEY_FILE):"
            " every HTTP request that needs a token is refused with 401"
        )
    halves = [
        asyncio.create_task(_stopping_on_failure(serve_http(container, stop), stop), name="http"),
        asyncio.create_task(_stopping_on_failure(serve_nats(container, stop), stop), name="nats"),
    ]
    waits_ended = asyncio.create_task(_end_waits(container, stop), name="end-waits")
    try:
        await asyncio.wait(halves)
    finally:
        waits_ended.cancel()
        for half in halves:
            half.cancel()  # only when serve_api itself is cancelled: else both are done
        # Let them unwind (uvicorn, the NATS drain) before the container closes under them.
        await asyncio.gather(*halves, return_exceptions=True)
    for half in halves:
        error = None if half.cancelled() else half.exception()
        if error is not None:
            raise error


async def _end_waits(container: Container, stop: asyncio.Event) -> None:
    """Once stopping, reads waiting for a consistency token answer (stale) at once: the
    drain finishes them rather than cancelling them after its grace."""
    await stop.wait()
    container.visits.stop_waiting()


async def _stopping_on_failure(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    try:
        await work
    except BaseException:
        stop.set()
        raise


async def _relay(container: Container, stop: asyncio.Event) -> None:
    key_ttl = timedelta(hours=container.settings.idempotency_key_ttl_hours)
    # Every relay instance prunes, NATS or not; SKIP LOCKED keeps them out of each other's way.
    pruner = asyncio.create_task(run_pruner(container.pool, stop, key_ttl), name="pruner")
    try:
        nats = await _measuring_the_outbox(container.connected_nats(stop), container.pool)
        if nats is None:  # stopped before NATS ever answered
            return
        replicas = container.settings.nats_stream_replicas
        # The relay's leadership lock and LISTEN are session state: a pool of its own.
        pool = await create_session_pool(container.settings.require_database_url())
        watch_pool("appointments-relay", pool)
        try:
            await run_relay(pool, nats, stop, replicas, container.doorbell)
        finally:
            await close_pool(pool)
    finally:
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner


async def _measuring_the_outbox(connecting: Awaitable[T], pool: asyncpg.Pool) -> T:
    """``connecting``'s result; meanwhile (NATS not reached since the start) the relay's
    backlog and lag gauges are measured every second, as a relay that lost NATS does."""
    exported(*RELAY_METRICS)  # from the relay role's start, before any OutboxRelay exists
    task = asyncio.ensure_future(connecting)
    try:
        while not task.done():
            await observe_outbox(pool)
            await asyncio.wait({task}, timeout=STANDBY_SECONDS)
        return task.result()
    finally:
        if not task.done():  # this role is being cancelled: so is its wait for NATS
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved


async def _projector(container: Container, stop: asyncio.Event) -> None:
    nats = await container.connected_nats(stop)
    if nats is None:  # stopped before NATS ever answered
        return
    replicas = container.settings.nats_stream_replicas
    await run_projector(container.pool, nats, stop, replicas, container.view_updates)


RoleRunner = Callable[[Container, asyncio.Event], Coroutine[Any, Any, None]]


def _role_runners() -> dict[str, RoleRunner]:
    return {"api": serve_api, "relay": _relay, "projector": _projector}


async def run_appointments(settings: Settings, roles: Sequence[str], stop: asyncio.Event) -> None:
    """Run ``roles`` until ``stop`` is set or one of them fails.

    The roles start at once: the HTTP API and the health endpoints serve while NATS is
    still unreachable (readiness says so), the roles that need NATS wait for it."""
    async with appointments_container(settings, wait_for_nats=False) as container:
        settle_heap()
        link = container.nats_link
        with link.closed_wins() if link is not None else contextlib.nullcontext():
            await run_roles(container, roles, stop)


async def _until_stopped_or_failed(tasks: set[asyncio.Task[Any]], stop: asyncio.Event) -> None:
    """Wait until ``stop`` is set, a role fails, or every role has returned."""
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    running: set[asyncio.Future[Any]] = set(tasks)
    try:
        while running and not stop.is_set():
            done, running = await asyncio.wait(
                running | {stopping}, return_when=asyncio.FIRST_COMPLETED
            )
            running.discard(stopping)
            if any(not task.cancelled() and task.exception() for task in done - {stopping}):
                return
    finally:
        stopping.cancel()


def settle_heap() -> None:
    """Take what start-up allocated (modules, the app, pools) out of the collector's way.

    ``gc.freeze`` moves every object alive now to a generation the collector never walks,
    so a full collection under load only looks at what was allocated since (tens of
    milliseconds less per collection on a busy two-core machine).
    """
    gc.collect()
    gc.freeze()


async def wind_down(
    tasks: set[asyncio.Task[Any]], grace: float, cancel_grace: float
) -> set[asyncio.Task[Any]]:
    """Give ``tasks``, asked to stop, ``grace`` seconds to end by themselves, then cancel
    those still running and give them ``cancel_grace`` more to unwind (before the pool and
    NATS close under them). The ones cancelled: cut short, what they raise is no failure of
    their own; one still running outlasts every cancellation (the stop deadline ends it)."""
    await asyncio.wait(tasks, timeout=grace)
    late = {task for task in tasks if not task.done()}
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=cancel_grace)
    return late


async def run_roles(container: Container, roles: Sequence[str], stop: asyncio.Event) -> None:
    """Run ``roles`` on ``container`` until ``stop`` is set; a failing role stops them all."""
    runners = _role_runners()
    tasks = {asyncio.create_task(runners[role](container, stop), name=role) for role in roles}
    if "api" not in roles:
        tasks.add(asyncio.create_task(_ops(container, stop), name="ops"))
    link = container.nats_link
    if link is not None:  # NATS closing the connection for good stops them all
        tasks.add(asyncio.create_task(link.watch(stop), name="nats-link"))
    log.info("appointments service running", extra={"roles": list(roles)})
    try:
        await _until_stopped_or_failed(tasks, stop)
    finally:
        # The grace starts now: a role slow to stop (a drain against a NATS server that
        # hangs) is cancelled after it, whatever stopped the service.
        stop.set()
        late = await wind_down(tasks, ROLE_GRACE_SECONDS, CANCEL_GRACE_SECONDS)
    log.info("appointments service stopped", extra={"roles": list(roles)})
    for task in tasks:
        if not task.done() or task.cancelled() or task in late:
            continue  # what a role cut short by the grace raised is no failure of its own
        error = task.exception()
        if error is not None:
            if link is not None and link.closed_by_server is not None:
                raise error  # the link logged the cause, and the process exits with it
            if config_error_in(error) is None:  # else the command line says it in one line
                log.error("role %s failed", task.get_name(), exc_info=error)
            raise error
