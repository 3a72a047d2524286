"""The composition root of the notification service: the only place adapters are chosen."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.appointments.adapters.nats.streams import (
    StreamConfigConflict,
    ensure_events_stream,
    ensure_stream,
    refusal_passes,
    stream_refused,
)
from services.appointments.bootstrap import StoppedWhileConnecting
from services.config import Settings
from services.notifications.channels import (
    PUSH_DUPLICATE_WINDOW_SECONDS,
    PushChannel,
    notifications_stream_config,
)
from services.notifications.consumer import EventConsumer, JetStreamEndings, ensure_consumer
from services.notifications.delivery import DeliveryWorker
from services.notifications.delivery_store import DeliveryStore
from services.notifications.directory import Directory
from services.notifications.email import EmailChannel, SmtpConfig
from services.notifications.handlers import EventHandler
from services.notifications.reminders import ReminderScheduler
from services.notifications.retention import Retention
from services.notifications.runtime import Clock, Hooks, Tuning
from services.notifications.store import NotificationStore
from services.waiting import idle

log = logging.getLogger(__name__)

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
    retention: Retention

    async def run(self, stop: asyncio.Event) -> None:
        """Run every part until ``stop`` is set; one failing stops them all."""
        scheduler_wake, *worker_wakes = self.wakeups
        async with asyncio.TaskGroup() as group:
            group.create_task(self.consumer.run(stop), name="consumer")
            group.create_task(self.scheduler.run(stop, scheduler_wake), name="reminders")
            for worker, wake in zip(self.workers, worker_wakes, strict=True):
                group.create_task(worker.run(stop, wake), name=f"{worker.channel} delivery")
            group.create_task(self.retention.run(stop), name="retention")


async def notification_service(
    settings: Settings,
    clock: Clock,
    tuning: Tuning,
    hooks: Hooks,
    pool: asyncpg.Pool,
    nc: NATS,
    smtp: SmtpConfig | None,
    stop: asyncio.Event | None = None,
) -> NotificationService:
    """Create or update the streams and the consumer, and build the service over the
    process's pool and NATS connection (the caller closes both). ``smtp``: also send e-mail
    (else push only).

    JetStream refusing the streams for a reason that passes (electing its leaders, no
    JetStream yet, say) is tried again for up to ``tuning.stream_setup_patience`` seconds,
    then is a :class:`ConfigError`, as refusing them for good is at once (more replicas
    than nodes, a stream of another kind). :class:`StoppedWhileConnecting` if ``stop`` is
    set meanwhile."""
    js = nc.jetstream()
    await _ensure_streams(js, settings.nats_stream_replicas, tuning, stop)
    store = NotificationStore(pool)
    deliveries = DeliveryStore(pool, settings.rules)

    def nats_connected() -> bool:
        return nc.is_connected

    # Both channels need NATS (push publishes on JetStream, email asks the directory over
    # it): while the connection is down their workers claim nothing, so an outage spends
    # no delivery's attempts. They look again at their next poll once it is back.
    workers = [
        DeliveryWorker(
            deliveries,
            PushChannel(js, stream=notifications_stream_config(settings.nats_stream_replicas)),
            clock,
            tuning,
            hooks,
            PUSH_RESEND_WINDOW,
            nats_connected,
        )
    ]
    if smtp is not None:
        email = EmailChannel(
            Directory(nc, tuning.directory_timeout, silence=tuning.directory_silence), smtp
        )
        workers.append(
            DeliveryWorker(deliveries, email, clock, tuning, hooks, None, nats_connected)
        )
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
        scheduler=ReminderScheduler(store, JetStreamEndings(js), clock, channels, tuning, wake),
        workers=workers,
        wakeups=wakeups,
        retention=Retention(
            pool, clock, timedelta(days=settings.notification_retention_days), tuning
        ),
    )


async def _ensure_streams(
    js: JetStreamContext, replicas: int, tuning: Tuning, stop: asyncio.Event | None
) -> None:
    deadline = time.monotonic() + tuning.stream_setup_patience
    delay = 0.5
    while True:
        try:
            await ensure_events_stream(js, replicas)
            await ensure_stream(js, notifications_stream_config(replicas))
            await ensure_consumer(js, tuning)
            return
        except StreamConfigConflict as exc:
            raise stream_refused(replicas, exc) from None
        except (nats.errors.Error, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            if not refusal_passes(exc) or time.monotonic() + delay > deadline:
                raise stream_refused(replicas, exc) from None
            log.warning("JetStream cannot make the streams yet, retrying in %.1fs: %s", delay, why)
        if stop is None:
            await asyncio.sleep(delay)
        elif await idle(stop, delay):
            raise StoppedWhileConnecting("stopped while JetStream made the streams")
        delay = min(delay * 2, 5.0)
