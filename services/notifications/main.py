"""Running the notification service (``clinic notifications``)."""

from __future__ import annotations

import asyncio
import logging

from services.appointments.adapters.system import utc_now
from services.appointments.bootstrap import StoppedWhileConnecting
from services.config import Settings
from services.notifications.bootstrap import notification_service
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
    (a process of its own; not inside ``clinic dev``, where the API serves them)."""
    try:
        await _run(settings, stop, clock, tuning or Tuning(), hooks or Hooks(), serve_ops_http)
    except StoppedWhileConnecting:
        log.info("notification service stopped before NATS answered")
        return
    log.info("notification service stopped")


async def _run(
    settings: Settings,
    stop: asyncio.Event,
    clock: Clock,
    tuning: Tuning,
    hooks: Hooks,
    serve_ops_http: bool,
) -> None:
    async with notification_service(settings, clock, tuning, hooks, stop) as service:
        log.info(
            "notification service running",
            extra={"channels": [worker.channel for worker in service.workers]},
        )
        if not serve_ops_http:
            await service.run(stop)
        else:
            probes = Probes(service.pool, service.nats)
            async with asyncio.TaskGroup() as group:
                group.create_task(service.run(stop))
                group.create_task(serve_ops(probes, settings.http_host, settings.http_port, stop))
