"""The composition root of the notification service: the only place adapters are chosen."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS

from services.appointments.adapters.nats.streams import ensure_events_stream, ensure_stream
from services.config import ConfigError, Settings
from services.notifications.channels import (
    PUSH_DUPLICATE_WINDOW_SECONDS,
    PushChannel,
    notifications_stream_config,
)
from services.notifications.consumer import EventConsumer, ensure_consumer
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import DeliveryStore
from services.notifications.directory import Directory
from services.notifications.email import EmailChannel, SmtpConfig
from services.notifications.handlers import EventHandler
from services.notifications.reminders import ReminderScheduler
from services.notifications.runtime import Clock, Hooks, Tuning
from services.notifications.store import NotificationStore

#: A resent push is de-duplicated by JetStream only inside its window; keep a margin.
PUSH_RESEND_WINDOW = timedelta(seconds=PUSH_DUPLICATE_WINDOW_SECONDS * 0.9)


@dataclass
class NotificationService:
    """The consumer, the reminder scheduler and a delivery worker per channel."""

    pool: asyncpg.Pool
    nats: NATS
    consumer: EventConsumer
    scheduler: ReminderScheduler
    workers: list[DeliveryWorker]
    wakeups: list[asyncio.Event]
    """The scheduler's, then each worker's: set when there is new work for them."""

    async def run(self, stop: asyncio.Event) -> None:
        """Run every part until ``stop`` is set; one failing stops them all."""
        scheduler_wake, *worker_wakes = self.wakeups
        async with asyncio.TaskGroup() as group:
            group.create_task(self.consumer.run(stop), name="consumer")
            group.create_task(self.scheduler.run(stop, scheduler_wake), name="reminders")
            for worker, wake in zip(self.workers, worker_wakes, strict=True):
                group.create_task(worker.run(stop, wake), name=f"{worker.channel} delivery")


async def notification_service(
    settings: Settings,
    clock: Clock,
    tuning: Tuning,
    hooks: Hooks,
    pool: asyncpg.Pool,
    nc: NATS,
    smtp: SmtpConfig | None,
) -> NotificationService:
    """Create or update the streams and the consumer, and build the service over the
    process's pool and NATS connection (the caller closes both). JetStream refusing the
    streams (no JetStream, more replicas than nodes) is a :class:`ConfigError`. ``smtp``:
    also send e-mail (else push only)."""
    js = nc.jetstream()
    replicas = settings.nats_stream_replicas
    try:
        await ensure_events_stream(js, replicas)
        await ensure_stream(js, notifications_stream_config(replicas))
        await ensure_consumer(js, tuning)
    except nats.errors.Error as exc:
        hint = ""
        if replicas > 1:
            hint = f"; {replicas} replicas need a JetStream cluster of {replicas} nodes"
        raise ConfigError(
            "JetStream refused the streams (CLINIC_NATS_URL, CLINIC_NATS_STREAM_REPLICAS="
            f"{replicas}): {exc or type(exc).__name__}{hint}"
        ) from None
    store = NotificationStore(pool)
    deliveries = DeliveryStore(pool)
    workers = [
        DeliveryWorker(deliveries, PushChannel(js), clock, tuning, hooks, PUSH_RESEND_WINDOW)
    ]
    if smtp is not None:
        email = EmailChannel(Directory(nc, tuning.directory_timeout), smtp)
        workers.append(DeliveryWorker(deliveries, email, clock, tuning, hooks, None))
    channels = [worker.channel for worker in workers]
    wakeups = [asyncio.Event() for _ in range(1 + len(workers))]

    def wake() -> None:
        for event in wakeups:
            event.set()

    handler = EventHandler(store, clock, settings.rules, channels, tuning)
    return NotificationService(
        pool=pool,
        nats=nc,
        consumer=EventConsumer(js, handler, store, tuning, hooks, wake),
        scheduler=ReminderScheduler(store, clock, channels, tuning, wake),
        workers=workers,
        wakeups=wakeups,
    )
