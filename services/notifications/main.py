"""Running the notification service (``clinic notifications``)."""

from __future__ import annotations

import asyncio
import logging

from services.appointments.adapters.system import utc_now
from services.config import Settings
from services.notifications.bootstrap import notification_service
from services.notifications.runtime import Clock, Hooks, Tuning

log = logging.getLogger(__name__)


async def run_notifications(
    settings: Settings,
    stop: asyncio.Event,
    clock: Clock = utc_now,
    *,
    tuning: Tuning | None = None,
    hooks: Hooks | None = None,
) -> None:
    """Consume appointment events, fire reminders and deliver notifications until ``stop``
    is set. ``tuning`` and ``hooks`` are for tests; production uses the defaults."""
    async with notification_service(
        settings, clock, tuning or Tuning(), hooks or Hooks()
    ) as service:
        log.info(
            "notification service running",
            extra={"channels": [worker.channel for worker in service.workers]},
        )
        await service.run(stop)
    log.info("notification service stopped")
