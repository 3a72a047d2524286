"""Running the notification service (``clinic notifications``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

import asyncpg

from services.appointments.adapters.system import utc_now
from services.appointments.bootstrap import NatsLink, StoppedWhileConnecting, pool_and_nats
from services.appointments.main import CANCEL_GRACE_SECONDS, ROLE_GRACE_SECONDS, wind_down
from services.config import Settings
from services.notifications.bootstrap import notification_service
from services.notifications.email import SmtpConfig
from services.notifications.runtime import Clock, Hooks, Tuning
from services.ops import Probes, serve_ops

log = logging.getLogger(__name__)


async def run_notifications(
    settings: Settings,
    stop: asyncio.Event,
    clock: Clock = utc_now,
    *,
    tuning: Tuning | None = None,
    hooks: Hooks | None = None,
    serve_ops_http: bool = False,
) -> None:
    """Consume appointment events, fire reminders and deliver notifications until ``stop``
    is set. ``tuning`` and ``hooks`` are for tests; production uses the defaults.
    ``serve_ops_http``: also serve ``/health/*`` and ``/metrics`` on ``CLINIC_HTTP_PORT``
    (a process of its own; not inside ``clinic dev``, where the API serves them), from the
    start: while NATS is unreachable the process is live and not ready."""
    smtp = SmtpConfig.from_url(settings.smtp_url) if settings.smtp_url else None
    async with pool_and_nats(settings, "notifications") as (pool, probe_pool, link):
        assert link is not None
        started = asyncio.Event()  # ready only once its streams and consumer exist
        with link.closed_wins():
            async with asyncio.TaskGroup() as group:
                if serve_ops_http:
                    probes = Probes(probe_pool, link, started)
                    ops = serve_ops(
                        probes,
                        settings.http_host,
                        settings.http_port,
                        stop,
                        settings.http_keep_alive_seconds,
                    )
                    group.create_task(ops, name="ops")
                service = _serve(
                    settings,
                    clock,
                    tuning or Tuning(),
                    hooks or Hooks(),
                    pool,
                    link,
                    smtp,
                    stop,
                    started,
                )
                group.create_task(within_grace(service, stop), name="notifications")
                group.create_task(link.watch(stop), name="nats-link")
    log.info("notification service stopped")


async def _serve(
    settings: Settings,
    clock: Clock,
    tuning: Tuning,
    hooks: Hooks,
    pool: asyncpg.Pool,
    link: NatsLink,
    smtp: SmtpConfig | None,
    stop: asyncio.Event,
    started: asyncio.Event,
) -> None:
    nc = await link.connected(stop)
    if nc is None:
        log.info("notification service stopped before NATS answered")
        return
    try:
        service = await notification_service(
            settings, clock, tuning, hooks, pool, nc, smtp, stop=stop
        )
    except StoppedWhileConnecting:
        log.info("notification service stopped before its streams were made")
        return
    started.set()
    log.info(
        "notification service running",
        extra={"channels": [worker.channel for worker in service.workers]},
    )
    await service.run(stop)


async def within_grace(
    work: Coroutine[Any, Any, None],
    stop: asyncio.Event,
    grace: float = ROLE_GRACE_SECONDS,
    cancel_grace: float = CANCEL_GRACE_SECONDS,
) -> None:
    """Run ``work``; once ``stop`` is set it has ``grace`` seconds to end by itself (as the
    appointments roles have), then it is cancelled and given ``cancel_grace`` more. One that
    outlasts both (a database that hangs: asyncpg shields a release from cancellation) is
    left behind, for the process's stop deadline; its failure is raised."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        late = await wind_down({task}, grace, cancel_grace)
    except asyncio.CancelledError:  # cancelled itself (a sibling failed): so is its work,
        task.cancel()  # which unwinds before the pool and NATS close under it
        await asyncio.wait({task}, timeout=cancel_grace)
        raise
    finally:
        stopping.cancel()
    if late:
        log.warning("the notification service did not stop within %.1fs: cancelled", grace)
        if not task.done():
            log.error("the notification service does not end: left behind")
            return
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
        return
    task.result()
